"""Quantization quality per recipe on a trained model: KL divergence and top-1 agreement vs the source.

Each format is produced by `mlx_gemma4.convert` from the same source and scored by
`mlx_gemma4.convert.report` (mean KL(source || converted) per position over the report's sample texts,
top-1 agreement, perplexity). mlx-lm's own 4-bit conversion of the same folder, run by mlx-lm's own
model, sits beside ours.

    python -m benchmarks.quant_quality                   # the bundled tiny model
    python -m benchmarks.quant_quality --model PATH --out benchmarks/results/NAME.md

mlx-lm 0.32 reads only the older `global_head_dim` spelling, so it converts a copy of the folder
whose config.json is rewritten that way (weights are linked, not copied).
"""

import argparse
import hashlib
import subprocess
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import mlx_lm

from benchmarks.compat import older_spelling_copy
from mlx_gemma4 import BUNDLED_MODEL, load_model
from mlx_gemma4.convert import convert
from mlx_gemma4.convert.report import compare, sample_prompts

FORMATS = {
    "bf16": dict(dtype="bfloat16"),
    "8-bit": dict(quantize=True, q_bits=8),
    "6-bit": dict(quantize=True, q_bits=6),
    "5-bit": dict(quantize=True, q_bits=5),
    "4-bit": dict(quantize=True, q_bits=4),
    "4-bit, group 32": dict(quantize=True, q_bits=4, q_group_size=32),
    "3-bit": dict(quantize=True, q_bits=3),
    "mixed_4_6": dict(quant_recipe="mixed_4_6"),
    "mixed_3_6": dict(quant_recipe="mixed_3_6"),
    "mxfp4": dict(quantize=True, q_mode="mxfp4"),
    "nvfp4": dict(quantize=True, q_mode="nvfp4"),
    "mxfp8": dict(quantize=True, q_mode="mxfp8"),
}


def float32(model):
    """Compute in float32 (stored values cast exactly; packed weights untouched), as the report does."""
    model.set_dtype(mx.float32)
    return model


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def parameter_count(folder: Path) -> int:
    return sum(v.size for f in folder.glob("*.safetensors") for v in mx.load(str(f)).values())


def row(name: str, folder: Path, quality, params: int) -> str:
    size = weight_bytes(folder)
    return (
        f"| {name} | {8 * size / params:.2f} | {size / 1e6:.2f} | {quality.kl:.4f} | {quality.top1:.1%} "
        f"| {quality.ppl_converted:.2f} |"
    )


def same_tensors(a: Path, b: Path) -> bool:
    load = lambda folder: {k: v for f in folder.glob("*.safetensors") for k, v in mx.load(str(f)).items()}  # noqa: E731
    ours, theirs = load(a), load(b)
    return ours.keys() == theirs.keys() and all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)


def provenance(model: Path) -> str:
    weights = sorted(model.glob("*.safetensors"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in weights)).hexdigest()[:16]
    commit = subprocess.run(
        ["git", "log", "-1", "--format=%h %cs", "--", str(model)], capture_output=True, text=True, cwd=model
    ).stdout.strip()
    return f"weights sha256 {digest}…, last commit touching the folder: {commit or 'none (uncommitted)'}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="an unquantized trained checkpoint folder (default: the bundled model)")
    parser.add_argument("--out", default="benchmarks/results/quant_quality_bundled.md")
    args = parser.parse_args()
    model = Path(args.model or BUNDLED_MODEL)
    command = "python -m benchmarks.quant_quality" + (f" --model {args.model}" if args.model else "")
    command += f" --out {args.out}"
    reference = float32(load_model(model))
    prompts, from_text = sample_prompts(model, reference.config.vocab_size)
    assert from_text, f"{model} has no tokenizer; quality needs text"
    params = parameter_count(model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, kwargs in FORMATS.items():
            out = convert(model, tmp / name, **kwargs)
            rows.append(row(name, out, compare(reference, float32(load_model(out)), prompts, True), params))
            print(rows[-1], flush=True)
        theirs = tmp / "mlx-lm-4bit"
        mlx_lm.convert(str(older_spelling_copy(model, tmp / "older")), mlx_path=str(theirs), quantize=True, q_bits=4)
        quality = compare(reference, float32(mlx_lm.load(str(theirs))[0]), prompts, True)
        rows.append(row("mlx-lm 4-bit (`mlx_lm.convert -q --q-bits 4`, run by mlx-lm)", theirs, quality, params))
        print(rows[-1])
        same = same_tensors(tmp / "4-bit", theirs)
    source_ppl = compare(reference, reference, prompts, True).ppl_source
    positions = sum(len(p) for p in prompts)
    table = "\n".join(rows)
    Path(args.out).write_text(f"""# Quantization quality on {model.name}

Mean KL(source || converted) of next-token distributions per position (nats), top-1 agreement and
perplexity, over the {len(prompts)} sample texts of `mlx_gemma4/convert/report.py` ({positions} positions).
Formats are stored as a user gets them (bf16 tensors, bf16 scales); every model, the source
included, computes in float32, so the numbers measure what the stored weights lost, not bf16
arithmetic (the bf16 row is 0 because the source is bf16). Bits per weight count every
stored byte (scales and biases included, unquantized norms and small matrices too) over the source's
{params:,} parameters. Group size 64 for affine formats unless stated; recipes in `convert/recipes.py`.
Matrices whose input width is not a multiple of the group size stay unquantized, so on a small model
the group size moves bits per weight as much as the bit width does.

Model: `{args.model or "mlx_gemma4/bundled/gemma4-tiny"}`; {provenance(model)}.
mlx {version("mlx")}, mlx-lm {version("mlx-lm")}, CPU.
Source perplexity: {source_ppl:.2f}.

    {command}

Our uniform 4-bit and mlx-lm's 4-bit store {"identical" if same else "different"} tensors.

| format | bits/weight | weights MB | KL (nats) | top-1 | perplexity |
|---|---|---|---|---|---|
{table}
""")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
