"""Decode-attention inputs laid out by the model's own caches and masks, shared by the emulator tests
and the on-device tests: keys in ring order after a sliding window has wrapped, prefixes of a growing
full cache, left-padded batches."""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from mlx_gemma4.cache import FullCache, SlidingCache
from mlx_gemma4.model.layers import attention_mask


@dataclass
class Case:
    queries: mx.array
    keys: mx.array
    values: mx.array
    mask: Optional[mx.array]
    scale: float


def _normal(shape, dtype, seed):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def decode_step(cache, heads, kv_heads, dim, dtype, prompt, steps, window=None, padding=None, seed=0) -> Case:
    """Fill `cache` with a `prompt`-token prefill and `steps` single-token steps, then take one more
    step: its query against the keys and values the cache hands out, masked as the model masks them."""
    batch = 1 if padding is None else len(padding)

    def tokens(length, salt):
        shape = (batch, kv_heads, length, dim)
        return _normal(shape, dtype, 1000 * seed + salt), _normal(shape, dtype, 1000 * seed + 500 + salt)

    cache.update_and_fetch(*tokens(prompt, 0))
    for step in range(steps):
        cache.update_and_fetch(*tokens(1, step + 1))
    positions = cache.key_positions(1)
    offset = cache.offset
    keys, values = cache.update_and_fetch(*tokens(1, steps + 1))
    needs_mask = padding is not None or window is not None
    mask = attention_mask(offset, 1, positions, window, padding) if needs_mask else None
    queries = _normal((batch, heads, 1, dim), dtype, seed * 1000 + 999)
    return Case(queries, keys, values, mask, dim**-0.5)


def sliding(heads, kv_heads, dim, dtype, window, steps, padding=None, seed=0) -> Case:
    """A sliding layer's ring buffer (window - 1 + 8 slots), `steps` tokens past a window-long prompt."""
    padding = None if padding is None else np.array(padding)
    cache = SlidingCache(window, rollback=8, left_padding=padding)
    return decode_step(cache, heads, kv_heads, dim, dtype, window, steps, window, padding, seed)


def full(heads, kv_heads, dim, dtype, length, padding=None, seed=0) -> Case:
    """A global layer's cache holding `length` tokens (a prefix view of a larger buffer)."""
    padding = None if padding is None else np.array(padding)
    cache = FullCache(left_padding=padding)
    return decode_step(cache, heads, kv_heads, dim, dtype, length - 1, 0, None, padding, seed)


# Gemma 4's shapes at emulator-friendly sizes.
CASES = {
    # E2B sliding layer (8:1, d=256), the ring buffer 40 tokens past its wrap
    "sliding-256-8:1-bf16-wrapped": lambda: sliding(8, 1, 256, mx.bfloat16, window=64, steps=40),
    # 26B/31B sliding layers (2:1), a left-padded batch of two
    "sliding-256-16:8-fp16-padded": lambda: sliding(16, 8, 256, mx.float16, window=32, steps=13, padding=[0, 5]),
    # 31B global layer (32:4 -> 16:2 here), 1000 keys: split over 16 chunks, the last one partial
    "full-512-16:2-bf16": lambda: full(16, 2, 512, mx.bfloat16, length=1000),
    # E2B global layer (8:1), a batch whose sequences have different lengths (left padding)
    "full-512-8:1-fp16-padded": lambda: full(8, 1, 512, mx.float16, length=333, padding=[0, 100]),
    # 16:1 at d=512: eight head groups share each staged tile of keys and values
    "full-512-16:1-fp32-padded": lambda: full(16, 1, 512, mx.float32, length=150, padding=[0, 21]),
    # E4B global layer (8:2): two head groups, one tile of float32 keys at a time
    "full-512-8:2-fp32": lambda: full(8, 2, 512, mx.float32, length=200),
    # 6:1 at d=512: three head groups, whose 96 threads do not divide the staged tile
    "full-512-12:2-fp16": lambda: full(12, 2, 512, mx.float16, length=100),
    # one query head per kv head: four simdgroups split each chunk's keys, nothing staged
    "sliding-256-4:4-bf16-wrapped": lambda: sliding(4, 4, 256, mx.bfloat16, window=32, steps=9),
    # 2:1 at d=512: four simdgroups split each chunk's keys
    "full-512-2:1-fp32-padded": lambda: full(4, 2, 512, mx.float32, length=261, padding=[3, 0]),
}
