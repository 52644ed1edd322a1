"""Load Gemma 4 checkpoints: a local folder or a hub id; sharded safetensors; lazy.

Accepted layouts (all normalised to our names, see `canonical_name`):
- transformers `Gemma4ForCausalLM` (`model.layers.*`) and `Gemma4ForConditionalGeneration`
  (`model.language_model.*`; its vision/audio towers make the multimodal wrapper, model/gemma4.py);
- mlx-lm and mlx-vlm conversions (`language_model.model.*`, experts split as `switch_glu.*`),
  quantized or not, with their `quantization` config block.
"""

import glob
import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigError, TextConfig
from .mapped import MappedEmbedding
from .model import Model
from .model.fused import fuse_projections
from .model.quantized_linear import kernel_layers_wanted, use_kernel_layers

MULTIMODAL_PREFIXES = (
    "vision_tower.",
    "audio_tower.",
    "embed_vision.",
    "embed_audio.",
    "multi_modal_projector.",
    "vision_embedder.",
)
TOWER_PREFIXES = ("vision_tower.", "embed_vision.", "audio_tower.", "embed_audio.")
SHARED_KV_WEIGHTS = ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.", "self_attn.v_norm.")
PLE_TABLE = "model.embed_tokens_per_layer.weight"
PLE_SCALES = "model.embed_tokens_per_layer.scales"
# Smaller tables stay resident: gathering from a map makes each step wait for its token on the host.
MAP_MIN_BYTES = 64 << 20
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.md"]


class LoadError(RuntimeError):
    """A checkpoint that cannot be loaded: says which file or tensor and what was expected."""


def resolve_path(path_or_repo: str) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LoadError(f"{path} is a file; expected a model folder with config.json and *.safetensors")
        return path
    if str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1:
        raise LoadError(f"model folder {path} does not exist (and it is not a hub id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_repo, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # network, auth, missing repo: one clear message
        raise LoadError(f"could not download {path_or_repo!r} from the Hugging Face hub: {error}") from error


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise LoadError(f"{file} is missing; a model folder needs config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise LoadError(f"{file} is not valid JSON: {error}") from error


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise LoadError(f"shard {path / missing[0]} listed in {index.name} is missing")
        return [path / s for s in shards]
    files = sorted(Path(f) for f in glob.glob(str(path / "*.safetensors")))
    if not files:
        raise LoadError(f"no *.safetensors weights in {path}")
    return files


def read_weights(files: list[Path]) -> tuple[dict, dict]:
    """All tensors (lazy), and for each the file and the name it is stored under."""
    weights, origin = {}, {}
    for file in files:
        try:
            tensors = mx.load(str(file))
        except Exception as error:
            raise LoadError(f"cannot read {file}: {error}") from error
        weights.update(tensors)
        origin.update({name: (file, name) for name in tensors})
    return weights, origin


def canonical_name(name: str, config: TextConfig) -> Optional[str]:
    """Our name for a checkpoint tensor (or module path), or None if the text model does not use it."""
    for prefix, replacement in (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ):
        if name.startswith(prefix):
            name = replacement + name[len(prefix) :]
            break
    bare = name.removeprefix("model.")
    if bare.startswith(MULTIMODAL_PREFIXES):
        return None
    if name.startswith("lm_head.") and config.tie_word_embeddings:
        return None
    if name.startswith("model.layers.") and any(s in name for s in SHARED_KV_WEIGHTS):
        layer = int(name.split(".")[2])
        if layer >= config.first_kv_shared_layer:
            return None  # KV-shared layers reuse another layer's keys/values
    name = name.replace(".experts.switch_glu.down_proj", ".experts.down_proj")
    if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        name += ".weight"
    return name


def sanitize(weights: dict, origin: dict, config: TextConfig) -> tuple[dict, dict]:
    """Rename to our names, drop what the text model does not use, fuse split expert projections."""
    out, out_origin, split = {}, {}, {}
    for name, value in weights.items():
        new = canonical_name(name, config)
        if new is None:
            continue
        if ".experts.switch_glu." in new:  # mlx-lm/mlx-vlm split gate/up: fuse them back
            base, proj, part = new.rsplit(".", 2)
            split.setdefault((base.removesuffix(".switch_glu"), part), {})[proj] = value
            out_origin[f"{base.removesuffix('.switch_glu')}.gate_up_proj.{part}"] = origin[name]
            continue
        out[new] = value
        out_origin[new] = origin[name]
    for (base, part), pieces in split.items():
        if set(pieces) != {"gate_proj", "up_proj"}:
            raise LoadError(f"{base}: found {sorted(pieces)} of the expert projections; need gate_proj and up_proj")
        out[f"{base}.gate_up_proj.{part}"] = mx.concatenate([pieces["gate_proj"], pieces["up_proj"]], axis=-2)
    return out, out_origin


def quantize_like_checkpoint(model: nn.Module, quantization: dict, weights: dict, config: TextConfig):
    """Quantize exactly the modules the checkpoint stores quantized (mlx-lm's convention)."""
    defaults = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
    overrides = {}
    for path, value in quantization.items():
        if isinstance(value, (dict, bool)):
            new = canonical_name(path + ".weight", config)
            if new is not None:
                overrides[new.removesuffix(".weight").replace(".switch_glu.gate_proj", ".gate_up_proj")] = value

    def predicate(path, module):
        if path in overrides and overrides[path] is not True:
            return overrides[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, class_predicate=predicate, **defaults)
    if kernel_layers_wanted():
        use_kernel_layers(model)


def check_shapes(model: nn.Module, weights: dict, origin: dict):
    expected = dict(nn.utils.tree_flatten(model.parameters()))
    for name, value in weights.items():
        if name not in expected:
            raise LoadError(f"tensor {name} in {origin[name][0]} is not a parameter of this Gemma 4 configuration")
        if tuple(value.shape) != tuple(expected[name].shape):
            raise LoadError(
                f"tensor {name} in {origin[name][0]} has shape {tuple(value.shape)}, "
                f"but config.json implies {tuple(expected[name].shape)}"
            )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise LoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")


def tower_weights(weights: dict, origin: dict) -> tuple[dict, dict]:
    """Vision/audio tower and projector tensors under the wrapper's names (`vision_tower.*`, ...):
    transformers stores them under `model.`, mlx-vlm at the top level."""
    towers, tower_origin = {}, {}
    for name, value in weights.items():
        bare = name.removeprefix("model.")
        if bare.startswith(TOWER_PREFIXES):
            towers[bare], tower_origin[bare] = value, origin[name]
    return towers, tower_origin


def build_model(raw: dict, config: TextConfig, towers: dict) -> Model:
    """The multimodal wrapper when the checkpoint holds a tower its config describes, else the text model."""
    from .model.gemma4 import Model as MultimodalModel, MultimodalConfig

    def holds(*prefixes):
        return any(name.startswith(prefixes) for name in towers)

    vision = bool(raw.get("vision_config")) and holds("vision_tower.", "embed_vision.")
    audio = bool(raw.get("audio_config")) and holds("audio_tower.", "embed_audio.")
    if not (vision or audio):
        return Model(config)
    try:
        return MultimodalModel(MultimodalConfig.from_dict(raw, vision=vision, audio=audio))
    except ConfigError as error:
        raise LoadError(f"config.json: {error}") from error


def load_model(path_or_repo: str, lazy: bool = False, map_ple: bool = True) -> Model:
    """Build the model described by the folder's config.json and load its weights.

    With `map_ple` a large unquantized per-layer embedding table (E2B/E4B) is gathered from a memory
    map of the checkpoint rather than held in memory.
    """
    path = resolve_path(str(path_or_repo))
    raw = read_config(path)
    try:
        config = TextConfig.from_dict(raw)
    except ConfigError as error:
        raise LoadError(f"{path / 'config.json'}: {error}") from error
    all_weights, all_origin = read_weights(weight_files(path))
    towers, tower_origin = tower_weights(all_weights, all_origin)
    model = build_model(raw, config, towers)
    weights, origin = sanitize(all_weights, all_origin, config)
    if getattr(model, "has_audio", False):  # transformers' channels-first convolutions -> MLX layout
        audio = model.audio_tower.sanitize({k.removeprefix("audio_tower."): v for k, v in towers.items()
                                            if k.startswith("audio_tower.")})  # fmt: skip
        towers.update({f"audio_tower.{k}": v for k, v in audio.items()})
    for name, value in towers.items():
        if name.split(".")[0] in model.children():
            weights[name], origin[name] = value, tower_origin[name]
    quantization = raw.get("quantization")
    if quantization:
        quantize_like_checkpoint(model, quantization, weights, config)
    table = weights.get(PLE_TABLE)
    if map_ple and table is not None and table.nbytes >= MAP_MIN_BYTES and PLE_SCALES not in weights:
        model.model.embed_tokens_per_layer = MappedEmbedding(*origin[PLE_TABLE])
        del weights[PLE_TABLE]
    check_shapes(model, weights, origin)
    model.load_weights(list(weights.items()), strict=True)
    del weights, all_weights, towers  # the model alone holds its arrays: fusing then frees those it replaces
    if not lazy:
        mx.eval(model.parameters())
        fuse_projections(model)
    model.eval()
    return model
