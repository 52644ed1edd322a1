"""The model's hook: `mx.fast.scaled_dot_product_attention` with decode steps on our kernel.

MLX's fused attention covers neither head_dim 512 nor (on CUDA) 256, so Gemma 4 decode runs unfused
there; our kernel takes those steps on a GPU. Everything else, and every step on the CPU, stays with
MLX's built-in op.
"""

from typing import Union

import mlx.core as mx

from .decode_attention import decode_attention, supports
from .kernel import backend


def scaled_dot_product_attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Union[None, str, mx.array] = None
) -> mx.array:
    decode_mask = mask if isinstance(mask, mx.array) else None  # a lone query is the newest token: "causal" is no mask
    if backend() != "reference" and supports(queries, keys, values, decode_mask):
        return decode_attention(queries, keys, values, scale, decode_mask)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
