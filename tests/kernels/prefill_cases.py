"""Prefill-attention inputs laid out by the model's own caches: a chunk of queries after a prompt, keys
as FullCache or SlidingCache return them for a multi-token update (a wrapped ring reordered to temporal
order), left-padded batches; with the mask the model builds, to check CausalMask against it."""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_gemma4.cache import FullCache, SlidingCache
from mlx_gemma4.kernels.prefill_attention import CausalMask
from mlx_gemma4.model.layers import attention_mask


@dataclass
class Chunk:
    queries: mx.array
    keys: mx.array
    values: mx.array
    mask: CausalMask
    model_mask: mx.array  # what mlx_gemma4.model builds on the host: [B or 1, 1, L, S]
    scale: float


def _normal(shape, dtype, seed):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


def chunk(cache, heads, kv_heads, dim, dtype, prompt, length, window=None, padding=None, seed=0) -> Chunk:
    """Fill `cache` with a `prompt`-token prefill (none if 0), then one `length`-token chunk: its queries
    against the keys and values the cache hands out, masked as the model masks them."""
    batch = 1 if padding is None else len(padding)

    def tokens(n, salt):
        shape = (batch, kv_heads, n, dim)
        return _normal(shape, dtype, 1000 * seed + salt), _normal(shape, dtype, 1000 * seed + 500 + salt)

    if prompt:
        cache.update_and_fetch(*tokens(prompt, 0))
    positions = cache.key_positions(length)
    offset = cache.offset
    keys, values = cache.update_and_fetch(*tokens(length, 1))
    model_mask = attention_mask(offset, length, positions, window, padding)
    queries = _normal((batch, heads, length, dim), dtype, seed * 1000 + 999)
    return Chunk(queries, keys, values, CausalMask.of_chunk(int(positions[0]), window, padding), model_mask, dim**-0.5)


def sliding(heads, kv_heads, dim, dtype, window, prompt, length, padding=None, seed=0) -> Chunk:
    """A sliding layer's chunk after `prompt` tokens: with prompt > window + 8 the ring has wrapped."""
    padding = None if padding is None else np.array(padding)
    cache = SlidingCache(window, rollback=8, left_padding=padding)
    return chunk(cache, heads, kv_heads, dim, dtype, prompt, length, window, padding, seed)


def full(heads, kv_heads, dim, dtype, prompt, length, padding=None, seed=0) -> Chunk:
    padding = None if padding is None else np.array(padding)
    return chunk(FullCache(left_padding=padding), heads, kv_heads, dim, dtype, prompt, length, None, padding, seed)


# Gemma 4's shapes at emulator-friendly sizes; no length is a multiple of a row tile or key step.
CHUNKS = {
    # E2B sliding layer (8:1, d=256): a chunk after the ring has wrapped, keys reordered by the cache
    "sliding-256-8:1-bf16-wrapped": lambda: sliding(8, 1, 256, mx.bfloat16, window=16, prompt=37, length=11),
    # 26B/31B sliding layers (2:1), a left-padded batch of two, padding longer than the window
    "sliding-256-2:1-fp16-padded": lambda: sliding(4, 2, 256, mx.float16, window=12, prompt=20, length=9,
                                                   padding=[0, 25]),
    # 31B global layer (32:4 -> 16:2 here), a second chunk
    "full-512-16:2-bf16": lambda: full(16, 2, 512, mx.bfloat16, prompt=21, length=5),
    # E2B global layer (8:1), a first chunk of a batch whose sequences have different lengths
    "full-512-8:1-fp16-padded": lambda: full(8, 1, 512, mx.float16, prompt=0, length=19, padding=[0, 6]),
    # E4B (4:1 here 2:1 at d=512, float32), padding in the first row
    "full-512-2:1-fp32-padded": lambda: full(2, 1, 512, mx.float32, prompt=13, length=10, padding=[3, 0]),
}
