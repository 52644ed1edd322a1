"""The model's hook: `mx.fast.scaled_dot_product_attention` with decode steps and prefill chunks on our
kernels where they are faster on a GPU.

MLX's fused attention covers neither head_dim 512 nor (on CUDA) 256, so Gemma 4 attention runs unfused
there. Decode steps go to decode_attention; prefill chunks whose mask is "causal" or a CausalMask
(rules, no L×S array) go to prefill_attention at the head dims in PREFILL_HEAD_DIMS (none yet: it is
slower than MLX). Everything else, and every call on the CPU, stays with MLX's built-in op.
"""

from typing import Union

import mlx.core as mx

from .decode_attention import plan as decode_plan
from .prefill_attention import CausalMask, prefill_attention
from .prefill_attention import supports as prefill_supports
from .kernel import backend

# Measured on an H100 (benchmarks/results/attention.md): with a single kv head serving 8 query heads
# (E2B's layout), MLX's unfused path overtakes the decode kernel beyond ~16K keys (d=512: 1.03x at 16K,
# 0.8x at 32K). Staging each key block in threadgroup memory for all query heads did not move that
# (0.59x at 128K, as before) and cost 31B's global layers a quarter of their speed, so it was reverted.
SINGLE_KV_HEAD_MAX_KEYS = 16384
# Measured on an H100 (benchmarks/results/attention_prefill.md): the prefill kernel (FMA, no tensor
# cores) runs at 0.03-0.37x of MLX's unfused matmul path at d=512 and 0.37-0.87x at d=256, so no head
# dim routes to it until a tensor-core body beats MLX.
PREFILL_HEAD_DIMS = ()


def scaled_dot_product_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: Union[None, str, mx.array, CausalMask] = None,
) -> mx.array:
    length = queries.shape[2]
    if length == 1:  # a decode step: its plan is cached per signature (decode_attention.plan)
        decode_mask = mask if isinstance(mask, mx.array) else None  # a lone query is the newest token
        mlx_is_faster = keys.shape[1] == 1 and keys.shape[2] > SINGLE_KV_HEAD_MAX_KEYS
        run = None if mlx_is_faster else decode_plan(queries, keys, values, decode_mask)
        if run is not None:
            return run(queries, keys, values, scale, decode_mask)
    else:
        if isinstance(mask, str) and mask == "causal":
            mask = CausalMask()
        if (
            isinstance(mask, CausalMask)
            and queries.shape[3] in PREFILL_HEAD_DIMS
            and backend() != "reference"
            and prefill_supports(queries, keys, values, mask)
        ):
            return prefill_attention(queries, keys, values, scale, mask)
    if isinstance(mask, CausalMask):
        mask = "causal" if mask.window is mask.first_key is None else mask.dense(length, keys.shape[2])
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
