"""What the output checkpoint looks like: tensor names and config.json, readable by us and by mlx-lm.

Tensor names are mlx-lm's module paths, which `mlx_gemma4.loading` also reads:
- `gemma4_text` checkpoints: our names (`model.layers.N....`, as `loading.sanitize` produces them);
- `gemma4` (multimodal) checkpoints: the same under `language_model.` (`language_model.model.layers...`),
  towers under mlx-vlm's names (`vision_tower.*`, `audio_tower.*`, `embed_vision.*`, `embed_audio.*`)
  and as the source stores them (for the vision tower, byte for byte what mlx-vlm 0.7.10 writes);
- MoE experts split as mlx-lm stores them: `experts.switch_glu.{gate,up,down}_proj`. Our loader fuses
  gate and up back into `experts.gate_up_proj` when it loads.

config.json keeps every key of the source and adds what mlx-lm 0.32 needs to build the same model:
the older `global_head_dim` / `num_global_key_value_heads` spelling next to transformers'
`per_layer_config` (written only when both spellings describe the same layers, which is checked), and
explicit values for fields whose mlx-lm defaults differ from transformers'. The quantization block is
mlx-lm's: defaults plus one entry per module stored differently from them.
"""

import copy
from dataclasses import fields
from typing import Optional

from ..config import FULL, TextConfig
from .recipes import QuantSpec

OLDER_SPELLING = ("global_head_dim", "num_global_key_value_heads")
EXPERT_SPLIT = {
    ".experts.gate_up_proj.weight": (".experts.switch_glu.gate_proj.weight", ".experts.switch_glu.up_proj.weight"),
    ".experts.down_proj.weight": (".experts.switch_glu.down_proj.weight",),
}


def output_pieces(name: str, value, multimodal: bool) -> list[tuple[str, object]]:
    """(output name, tensor) pairs for one of our text tensors; fused experts are split in two."""
    prefix = "language_model." if multimodal else ""
    for suffix, targets in EXPERT_SPLIT.items():
        if name.endswith(suffix):
            base = name.removesuffix(suffix)
            parts = [value] if len(targets) == 1 else _halves(value)
            return [(prefix + base + target, part) for target, part in zip(targets, parts)]
    return [(prefix + name, value)]


def _halves(value):
    half = value.shape[-2] // 2
    return [value[..., :half, :], value[..., half:, :]]


def quantization_block(spec: QuantSpec, modules: dict[str, QuantSpec]) -> dict:
    """mlx-lm's `quantization` dict: defaults, then the modules whose spec differs from them."""
    block = spec.as_config()
    block.update({path: s.as_config() for path, s in sorted(modules.items()) if s != spec})
    return block


def output_config(source: dict, text: TextConfig, dtype: Optional[str], quantization: Optional[dict]) -> dict:
    config = copy.deepcopy(source)
    fields_ = config.setdefault("text_config", {}) if config.get("model_type") == "gemma4" else config
    _spell_out(fields_, text)
    config.setdefault("vocab_size", text.vocab_size)  # mlx-lm's gemma4 wrapper overrides text_config's with it
    if dtype is not None:
        for holder in {id(config): config, id(fields_): fields_}.values():
            holder["dtype"] = dtype
            holder.pop("torch_dtype", None)
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization  # the key transformers-style tools look for
    return config


def _spell_out(fields_: dict, text: TextConfig):
    """Write every setting explicitly, so readers with other defaults (mlx-lm) build the same layers."""
    fields_["layer_types"] = list(text.layer_types)
    fields_.pop("sliding_window_pattern", None)
    for field in fields(TextConfig):
        if field.name not in ("layers", "per_layer_config", *OLDER_SPELLING):
            fields_.setdefault(field.name, copy.deepcopy(getattr(text, field.name)))
    older = _older_spelling(text)
    candidate = {**{k: v for k, v in fields_.items() if k != "per_layer_config"}, **older}
    # Irregular per_layer_config (not seen in released checkpoints) has no older spelling: leave it out,
    # so that mlx-lm fails loudly on shapes instead of building other layers.
    if TextConfig.from_dict({**candidate, "model_type": "gemma4_text"}).layers == text.layers:
        fields_.update(older)


def _older_spelling(text: TextConfig) -> dict:
    """global_head_dim / num_global_key_value_heads read off the resolved global layers."""
    full = [spec for spec in text.layers if spec.layer_type == FULL]
    older = {"global_head_dim": full[0].head_dim if full else text.head_dim}
    if text.attention_k_eq_v and full:
        older["num_global_key_value_heads"] = full[0].num_kv_heads
    return older
