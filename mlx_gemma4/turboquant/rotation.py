"""The seeded randomized Hadamard rotation R = H·diag(s)/√d (s a ±1 vector drawn from a seed).

Each layer draws its own signs for keys and for values. `fwht` is the reference butterfly: the encode
kernel performs the same additions in the same order (lowest stride first), so both produce the same
rotated coordinates bit for bit. On the GPU the decode kernels rotate queries and outputs with the
same butterflies in threadgroup memory; the references (CPU, prefill) rotate them, never quantized,
by one matmul with the dense Hadamard matrix (fewer MLX operations than the butterflies).
"""

import math
from functools import lru_cache

import mlx.core as mx
import numpy as np


def signs(seed: int, dim: int) -> mx.array:
    """±1 float32 [dim], the same for a seed on every platform."""
    return mx.array(np.random.default_rng(seed).integers(0, 2, dim).astype(np.float32) * 2 - 1)


def layer_seed(seed: int, layer: int, values: bool) -> int:
    """Distinct, reproducible seeds per (layer, keys|values)."""
    return (seed * 1_000_003 + layer) * 2 + int(values)


def fwht(x: mx.array) -> mx.array:
    """Unnormalised Walsh-Hadamard transform over the last axis (a power of two), in butterflies."""
    shape, dim = x.shape, x.shape[-1]
    if dim & (dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two head dim, got {dim}")
    step = 1
    while step < dim:
        pairs = x.reshape(-1, dim // (2 * step), 2, step)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        x = mx.stack([a + b, a - b], axis=2).reshape(shape)
        step *= 2
    return x


@lru_cache(maxsize=None)
def hadamard(dim: int) -> mx.array:
    """The symmetric Hadamard matrix H (H·H = d·I) scaled by 1/√d, float32."""
    return fwht(mx.eye(dim, dtype=mx.float32)) * (1 / math.sqrt(dim))


def rotate(x: mx.array, sign: mx.array) -> mx.array:
    """R·x over the last axis, float32 (float64 for float64 x: tests' exact references)."""
    return (_at_least_float32(x) * sign) @ hadamard(x.shape[-1])


def unrotate(y: mx.array, sign: mx.array) -> mx.array:
    """Rᵀ·y = diag(s)·H·y/√d over the last axis, float32 (float64 for float64 y)."""
    return (_at_least_float32(y) @ hadamard(y.shape[-1])) * sign


def _at_least_float32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float64 else x.astype(mx.float32)
