"""convert(): a Gemma 4 checkpoint (Hugging Face or MLX, local or hub) -> an MLX checkpoint, maybe quantized."""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .errors import ConvertError
from .files import copy_side_files, model_card
from .layout import output_config, output_pieces, quantization_block
from .recipes import QuantSpec, Rule, make_rule, recipe_specs
from .source import Source, read_source
from .writer import SHARD_BYTES, check_destination, check_disk_space, staging_folder, write_weights

DTYPES = ("bfloat16", "float16", "float32")


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: str = "affine",
    quant_recipe: Optional[str] = None,
    dtype: Optional[str] = None,
    upload_repo: Optional[str] = None,
    force: bool = False,
    report: bool = False,
    max_shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Convert `hf_path` into the folder `mlx_path` (see convert/README.md); returns the folder.

    `quant_recipe` (e.g. "mixed_4_6") implies `quantize`. `dtype` defaults to the source's dtype.
    Problems found before writing raise ConvertError; whatever fails, nothing is left under `mlx_path`.
    """
    out = Path(mlx_path).expanduser()
    check_destination(out, force)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    spec, high = (None, None)
    if quantize or quant_recipe:
        spec, high = recipe_specs(q_bits, q_group_size, q_mode, quant_recipe)
    elif q_bits or q_group_size or q_mode != "affine":
        raise ConvertError("--q-bits, --q-group-size and --q-mode take effect only with -q (quantize=True)")
    source = read_source(hf_path)
    if out.exists() and out.resolve() == source.path.resolve():
        raise ConvertError(f"{out} is the source folder; write the conversion somewhere else")
    rule = make_rule(source.text_config, spec, high) if spec else None
    dtype = dtype or source_dtype(source.config)
    tensors, modules = plan_tensors(source, rule, dtype)
    quantization = quantization_block(spec, modules) if spec else None
    config = output_config(source.config, source.text_config, dtype, quantization)
    side_files = source.side_files()
    check_disk_space(out, sum(v.nbytes for v in tensors.values()) + sum(f.stat().st_size for f in side_files))
    summary = describe(source, tensors, spec, high, quant_recipe, dtype)
    command = command_line(hf_path, out, spec, quant_recipe, dtype)
    source_path, multimodal = source.path, source.multimodal
    del source  # the lazy outputs alone must reference the source arrays, so each shard frees them
    with staging_folder(out) as folder:
        write_weights(folder, tensors, max_shard_bytes)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(side_files, folder)
        card = model_card(str(hf_path), source_path, out.name, command, summary, multimodal)
        (folder / "README.md").write_text(card)
    print(f"Wrote {out}")
    if report:
        from .report import format_quality, quality

        print(format_quality(quality(source_path, out)))
    if upload_repo:
        upload(out, upload_repo)
    return out


def source_dtype(config: dict) -> Optional[str]:
    for holder in (config, config.get("text_config") or {}):
        dtype = holder.get("dtype") or holder.get("torch_dtype")
        if dtype in DTYPES:
            return dtype
    return None


def plan_tensors(source: Source, rule: Optional[Rule], dtype: Optional[str]) -> tuple[dict, dict]:
    """Lazy output tensors by output name, and the QuantSpec of every quantized module."""
    target = getattr(mx, dtype) if dtype else None
    tensors, modules = {}, {}
    for name, value in sorted(source.text.items()):
        spec = rule(name, value.shape) if rule else None
        for out_name, piece in output_pieces(name, value, source.multimodal):
            piece = cast(piece, target)
            if spec is None:
                tensors[out_name] = piece
                continue
            module = out_name.removesuffix(".weight")
            modules[module] = spec
            packed = mx.quantize(piece, spec.group_size, spec.bits, mode=spec.mode)
            tensors.update({f"{module}.{part}": array for part, array in zip(("weight", "scales", "biases"), packed)})
    for name, value in sorted(source.towers.items()):
        tensors[name] = cast(value, target)
    return tensors, modules


def cast(value: mx.array, target) -> mx.array:
    if target is None or not mx.issubdtype(value.dtype, mx.floating) or value.dtype == target:
        return value
    return value.astype(target)


def describe(source: Source, tensors: dict, spec, high, recipe: Optional[str], dtype) -> list:
    """Rows of the model card's table."""
    params = sum(v.size for v in source.text.values())
    text_bytes = sum(v.nbytes for k, v in tensors.items() if k not in source.towers)
    if spec is None:
        storage = dtype or "as stored in the source"
    elif recipe:
        storage = f"recipe {recipe}: {spec.bits}- and {high.bits}-bit affine, group size {spec.group_size}"
    else:
        storage = f"{spec.bits}-bit {spec.mode}, group size {spec.group_size}"
    rows = [
        ("Weights", storage),
        ("Text decoder", f"{params / 1e6:,.1f} M parameters, {text_bytes / 1e6:,.1f} MB, "
         f"{8 * text_bytes / params:.2f} bits per weight"),
    ]
    if source.towers:
        towers = sorted({name.split(".")[0] for name in source.towers})
        rows.append(("Towers (not quantized)", ", ".join(towers)))
    return rows


def command_line(hf_path, out: Path, spec: Optional[QuantSpec], recipe: Optional[str], dtype) -> str:
    parts = ["mlx_gemma4.convert", "--hf-path", str(hf_path), "--mlx-path", out.name]
    if recipe:
        parts += ["--quant-recipe", recipe, "--q-group-size", str(spec.group_size)]
    elif spec:
        parts += ["-q", "--q-bits", str(spec.bits), "--q-group-size", str(spec.group_size), "--q-mode", spec.mode]
    if dtype:
        parts += ["--dtype", dtype]
    return " ".join(parts)


def upload(folder: Path, repo: str):
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model")
    except Exception as error:  # network, auth: the conversion itself stands
        raise ConvertError(f"{folder} was written, but uploading it to {repo} failed: {error}") from error
    print(f"Uploaded to https://huggingface.co/{repo}")
