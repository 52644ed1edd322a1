"""Inputs for the MoE kernels' tests: random routing and expert weights in every format the kernels read
(float32/float16/bfloat16, affine 4/8-bit at the converter's group sizes), at a size given by the test."""

from dataclasses import dataclass

import mlx.core as mx

from mlx_gemma4.kernels.moe_router import random_packed
from mlx_gemma4.kernels.moe_weights import Packed

# (dtype, bits, group size): 0 bits is float weights
FORMATS = {
    "f32": (mx.float32, 0, 0),
    "bf16": (mx.bfloat16, 0, 0),
    "fp16": (mx.float16, 0, 0),
    "q4-g64-bf16": (mx.bfloat16, 4, 64),
    "q8-g64-bf16": (mx.bfloat16, 8, 64),
    "q4-g32-fp16": (mx.float16, 4, 32),
    "q8-g128-f32": (mx.float32, 8, 128),
}
# Chunking edge cases of the experts' emulator tests only: a 16-byte chunk is 32 values at 4 bits and 16 at
# 8, so group 32 at 8 bits is two chunks a group and group 128 at 4 bits four.
CHUNK_FORMATS = {
    "q8-g32-bf16": (mx.bfloat16, 8, 32),
    "q4-g128-fp16": (mx.float16, 4, 128),
}


@dataclass
class RouterCase:
    x: mx.array
    proj: Packed
    scale: mx.array
    per_expert_scale: mx.array
    top_k: int
    eps: float = 1e-6


@dataclass
class ExpertsCase:
    x: mx.array
    indices: mx.array
    weights: mx.array
    gate_up: Packed
    down: Packed


def router_case(fmt: str, tokens: int, hidden: int, experts: int = 128, top_k: int = 8, seed: int = 0) -> RouterCase:
    dtype, bits, group = FORMATS[fmt]
    keys = mx.random.split(mx.random.key(seed), 4)
    return RouterCase(
        x=(3 * mx.random.normal((tokens, hidden), key=keys[0])).astype(dtype),
        proj=random_packed((experts, hidden), bits, group, dtype, keys[1]),
        scale=mx.random.uniform(0.5, 1.5, (hidden,), key=keys[2]).astype(dtype),
        per_expert_scale=mx.random.uniform(0.5, 1.5, (experts,), key=keys[3]).astype(dtype),
        top_k=top_k,
    )


def experts_case(fmt: str, tokens: int, hidden: int, inner: int, experts: int = 16, top_k: int = 8,
                 seed: int = 0) -> ExpertsCase:
    dtype, bits, group = {**FORMATS, **CHUNK_FORMATS}[fmt]
    keys = mx.random.split(mx.random.key(seed), 5)
    chosen = mx.argsort(mx.random.uniform(shape=(tokens, experts), key=keys[0]), axis=-1)[:, :top_k]
    return ExpertsCase(
        x=mx.random.normal((tokens, hidden), key=keys[1]).astype(dtype),
        indices=chosen.astype(mx.uint32),
        weights=mx.softmax(mx.random.normal((tokens, top_k), key=keys[2]), axis=-1),
        gate_up=random_packed((experts, 2 * inner, hidden), bits, group, dtype, keys[3]),
        down=random_packed((experts, hidden, inner), bits, group, dtype, keys[4]),
    )
