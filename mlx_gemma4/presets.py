"""The four released Gemma 4 text decoders at real size, as config dicts, and random-weight builds.

Dimensions from ../shared/research/gemma4-runtimes.md §4 (31B verbatim; the others from agreeing
secondary sources). Random weights are right for speed and memory work, never for quality.
"""

import mlx.core as mx
import mlx.nn as nn

from .config import FULL, SLIDING, TextConfig
from .model import Model
from .model.fused import fuse_projections
from .model.moe import QuantizedSwitchLinear
from .model.quantized_linear import kernel_layers_wanted, use_kernel_layers


def _pattern(n_layers: int, period: int) -> list:
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(n_layers)]


_FAMILY = dict(
    vocab_size=262_144,
    head_dim=256,
    global_head_dim=512,
    final_logit_softcapping=30.0,
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)

PRESETS = {
    "E2B": dict(
        _FAMILY, hidden_size=1536, num_hidden_layers=35, layer_types=_pattern(35, 5), sliding_window=512,
        max_position_embeddings=131_072, num_attention_heads=8, num_key_value_heads=1, intermediate_size=6144,
        use_double_wide_mlp=True, num_kv_shared_layers=20, hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262_144,
    ),
    "E4B": dict(
        _FAMILY, hidden_size=2560, num_hidden_layers=42, layer_types=_pattern(42, 6), sliding_window=512,
        max_position_embeddings=131_072, num_attention_heads=8, num_key_value_heads=2, intermediate_size=10240,
        num_kv_shared_layers=18, hidden_size_per_layer_input=256, vocab_size_per_layer_input=262_144,
    ),
    "26B-A4B": dict(
        _FAMILY, hidden_size=2816, num_hidden_layers=30, layer_types=_pattern(30, 6), sliding_window=1024,
        max_position_embeddings=262_144, num_attention_heads=16, num_key_value_heads=8,
        num_global_key_value_heads=2, attention_k_eq_v=True, intermediate_size=2112, enable_moe_block=True,
        num_experts=128, top_k_experts=8, moe_intermediate_size=704, hidden_size_per_layer_input=0,
    ),
    "31B": dict(
        _FAMILY, hidden_size=5376, num_hidden_layers=60, layer_types=_pattern(60, 6), sliding_window=1024,
        max_position_embeddings=262_144, num_attention_heads=32, num_key_value_heads=16,
        num_global_key_value_heads=4, attention_k_eq_v=True, intermediate_size=21504,
        hidden_size_per_layer_input=0,
    ),
}

ROWS_PER_CHUNK = 8192  # random float tables are made in slices, never whole in float32


def preset_config(name: str) -> TextConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return TextConfig(**PRESETS[name])


def random_model(name: str, bits: int | None = None, group_size: int = 64, dtype=mx.bfloat16, seed: int = 0) -> Model:
    """A real-size model with random weights (std 0.02, norms 1), optionally affine-quantized.

    `dtype` is the float type of weights, scales and hence activations (float32 runs quantized
    matmuls far faster than bfloat16 on MLX's CPU backend).
    """
    mx.random.seed(seed)
    model = Model(preset_config(name))
    if bits:
        nn.quantize(model, group_size, bits)  # lazy: nothing is computed until the loop below
        if kernel_layers_wanted():
            use_kernel_layers(model)
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
            _fill_quantized(module, dtype)
        else:
            # Only this module's own arrays: evaluating its children here would materialise the lazy
            # float initialisation of layers that are about to be quantized.
            local = {k: _random_like(k, v.shape, dtype) for k, v in module.items() if isinstance(v, mx.array)}
            module.update(local)
            mx.eval(local)
    return fuse_projections(model)


def _random_like(name: str, shape, dtype) -> mx.array:
    if (name == "weight" and len(shape) == 1) or name in ("scale", "per_expert_scale", "layer_scalar"):
        return mx.ones(shape, dtype)
    chunks = [
        (0.02 * mx.random.normal((min(ROWS_PER_CHUNK, shape[0] - s), *shape[1:]))).astype(dtype)
        for s in range(0, shape[0], ROWS_PER_CHUNK)
    ]
    return mx.concatenate(chunks) if len(chunks) > 1 else chunks[0]


def _fill_quantized(module, dtype):
    """Uniformly random affine codes with a fixed scale: weights of std ~0.02 at no float cost."""
    levels = 2**module.bits
    scale = 0.02 * (12 / (levels**2 - 1)) ** 0.5  # std of a uniform code times scale = 0.02
    module.weight = mx.random.randint(-(2**31), 2**31 - 1, module.weight.shape, dtype=mx.int32).view(mx.uint32)
    module.scales = mx.full(module.scales.shape, scale, dtype)
    module.biases = mx.full(module.biases.shape, -scale * (levels - 1) / 2, dtype)
    mx.eval(module.parameters())
