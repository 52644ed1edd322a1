"""The model's hook: `mx.fast.scaled_dot_product_attention` with decode steps on our kernel.

MLX's fused attention covers neither head_dim 512 nor (on CUDA) 256, so Gemma 4 decode runs unfused
there; our kernel takes those steps on a GPU. Everything else, and every step on the CPU, stays with
MLX's built-in op.
"""

from typing import Union

import mlx.core as mx

from .decode_attention import decode_attention, supports
from .kernel import backend

# Measured on an H100 (benchmarks/results/attention.md): with a single kv head serving 8 query heads
# (E2B's layout), MLX's unfused path overtakes the kernel beyond ~16K keys.
SINGLE_KV_HEAD_MAX_KEYS = 16384


def scaled_dot_product_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Union[None, str, mx.array] = None
) -> mx.array:
    decode_mask = mask if isinstance(mask, mx.array) else None  # a lone query is the newest token: "causal" is no mask
    mlx_is_faster = keys.shape[1] == 1 and keys.shape[2] > SINGLE_KV_HEAD_MAX_KEYS
    if backend() != "reference" and not mlx_is_faster and supports(queries, keys, values, decode_mask):
        return decode_attention(queries, keys, values, scale, decode_mask)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
