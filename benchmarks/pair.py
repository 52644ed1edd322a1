"""Our model and mlx-lm's Gemma 4 holding the same weight arrays, checked to compute the same logits.

mlx-lm's model is built from our resolved config (its own `ModelArgs` defaults differ from
transformers'), quantized module for module like ours, and given our arrays: the same objects, except
the experts' fused gate/up tensors, which mlx-lm keeps as two halves.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import gemma4_text

from mlx_gemma4 import load_model, presets
from mlx_gemma4.config import FULL, SLIDING, TextConfig
from mlx_gemma4.model.moe import QuantizedSwitchLinear

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
# Our fused expert tensors -> mlx-lm's names; several names split the tensor along axis -2 (rows).
EXPERT_NAMES = {
    "experts.gate_up_proj": ("experts.switch_glu.gate_proj", "experts.switch_glu.up_proj"),
    "experts.down_proj": ("experts.switch_glu.down_proj",),
}
# ||ours - theirs|| / ||theirs|| allowed for the logits; bf16 rounding differs between the two graphs.
TOLERANCE = {mx.float32: 1e-4, mx.float16: 3e-2, mx.bfloat16: 3e-2}


@dataclass
class Pair:
    name: str
    ours: nn.Module
    theirs: nn.Module


def from_preset(
    name: str, bits: Optional[int], group_size: int, dtype, layers: Optional[int] = None, vocab: Optional[int] = None
) -> Pair:
    if layers or vocab:
        name = reduced_preset(name, layers, vocab)
    ours = presets.random_model(name, bits=bits, group_size=group_size, dtype=dtype)
    return Pair(name, ours, mlx_lm_twin(ours))


def from_checkpoint(path: str, bits: Optional[int], group_size: int) -> Pair:
    """A checkpoint as stored; `bits` quantizes it only when it is stored unquantized."""
    ours = load_model(path, map_ple=False)  # mlx-lm needs the per-layer table as an array
    if bits and not any(isinstance(m, QUANTIZED) for _, m in ours.named_modules()):
        nn.quantize(ours, group_size, bits, class_predicate=lambda _, m: _quantizable(m, group_size))
        mx.eval(ours.parameters())
    return Pair(Path(path).name, ours, mlx_lm_twin(ours))


def _quantizable(module, group_size: int) -> bool:
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0


def reduced_preset(name: str, layers: Optional[int] = None, vocab: Optional[int] = None) -> str:
    """Register preset `name` cut to its first `layers` decoder layers and/or a `vocab`-token vocabulary
    (for small machines: a 262K-token head alone takes ~0.5 s a token on 2 CPU cores); its name.

    KV sharing is scaled down with the layers, as far as every shared layer keeps an earlier layer of
    its type that computes keys and values.
    """
    base = presets.preset_config(name)
    layers = layers or base.num_hidden_layers
    types = base.layer_types[:layers]
    types[-1] = FULL  # as transformers forces for the last layer
    shared = round(base.num_kv_shared_layers * layers / base.num_hidden_layers)
    while shared and not set(types[layers - shared :]) <= set(types[: layers - shared]):
        shared -= 1
    vocab = vocab or base.vocab_size
    reduced = f"{name}/{layers}L" + (f"/{vocab}V" if vocab != base.vocab_size else "")
    # presets.random_model builds only registered presets; this adds one.
    presets.PRESETS[reduced] = dict(
        presets.PRESETS[name],
        num_hidden_layers=layers,
        layer_types=types,
        num_kv_shared_layers=shared,
        vocab_size=vocab,
        vocab_size_per_layer_input=vocab,
    )
    return reduced


def mlx_lm_args(config: TextConfig) -> gemma4_text.ModelArgs:
    full = next(s for s in config.layers if s.layer_type == FULL)
    sliding = next((s for s in config.layers if s.layer_type == SLIDING), full)
    return gemma4_text.ModelArgs(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=sliding.head_dim,
        global_head_dim=full.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        vocab_size=config.vocab_size,
        vocab_size_per_layer_input=config.vocab_size_per_layer_input,
        num_key_value_heads=sliding.num_kv_heads,
        num_global_key_value_heads=full.num_kv_heads if full.k_eq_v else None,
        num_kv_shared_layers=config.num_kv_shared_layers,
        hidden_size_per_layer_input=config.hidden_size_per_layer_input if config.has_ple else 0,
        rope_parameters=config.rope_parameters,
        sliding_window=config.sliding_window,
        max_position_embeddings=config.max_position_embeddings,
        attention_k_eq_v=config.attention_k_eq_v,
        final_logit_softcapping=config.final_logit_softcapping,
        use_double_wide_mlp=config.use_double_wide_mlp,
        enable_moe_block=config.enable_moe_block,
        num_experts=config.num_experts,
        top_k_experts=config.top_k_experts,
        moe_intermediate_size=config.moe_intermediate_size,
        layer_types=list(config.layer_types),
        tie_word_embeddings=config.tie_word_embeddings,
    )


def their_names(name: str) -> tuple:
    """mlx-lm's name(s) for one of our module paths or parameter names."""
    for ours, theirs in EXPERT_NAMES.items():
        if ours in name:
            return tuple(name.replace(ours, t) for t in theirs)
    return (name,)


def mlx_lm_twin(ours: nn.Module) -> nn.Module:
    """mlx-lm's Gemma 4 with our weights; its lazy random initialisation is never evaluated."""
    theirs = gemma4_text.Model(mlx_lm_args(ours.config))
    quantization = {
        their: {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
        for path, m in ours.named_modules()
        if isinstance(m, QUANTIZED)
        for their in their_names(path)
    }
    nn.quantize(theirs, class_predicate=lambda path, _: dict(quantization[path]) if path in quantization else False)
    weights = []
    for name, value in tree_flatten(ours.parameters()):
        names = their_names(name)
        parts = mx.split(value, len(names), axis=-2) if len(names) > 1 else [value]
        weights += [(n, mx.contiguous(p) if len(names) > 1 else p) for n, p in zip(names, parts)]
    theirs.load_weights(weights, strict=True)
    mx.eval(theirs.parameters())
    return theirs


def check_same_logits(pair: Pair, tokens: int = 16, seed: int = 0) -> dict:
    """Logits of a prompt and of one decode step after it, ours vs mlx-lm; raises if they differ.

    The prompt is long enough for the MoE's sorted-expert path; the decode step goes through both caches.
    """
    config = pair.ours.config
    ids = mx.array(np.random.default_rng(seed).integers(0, config.vocab_size, (1, tokens)), dtype=mx.int32)
    ours_cache, their_cache = pair.ours.make_cache(), pair.theirs.make_cache()
    ours = [pair.ours(ids, cache=ours_cache)[:, -1]]
    theirs = [pair.theirs(ids, cache=their_cache)[:, -1]]
    step = mx.argmax(ours[0], axis=-1)[None]
    ours.append(pair.ours(step, cache=ours_cache)[:, -1])
    theirs.append(pair.theirs(step, cache=their_cache)[:, -1])
    a = np.array(mx.concatenate(ours).astype(mx.float32))
    b = np.array(mx.concatenate(theirs).astype(mx.float32))
    gap = {
        "tokens": tokens,
        "max_abs_diff": float(np.abs(a - b).max()),
        "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }
    dtype = pair.ours.model.norm.weight.dtype
    if not gap["rel_l2"] <= TOLERANCE[dtype]:
        raise RuntimeError(f"{pair.name}: our logits and mlx-lm's differ ({gap}); the comparison would be void")
    return gap
