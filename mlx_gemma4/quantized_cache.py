"""Quantized KV caches on every layer: TurboQuant (default 4/4 bits) or MLX affine (8 or 4 bits).

A quantized cache is the plain cache (cache.py) holding packed uint32 rows instead of keys/values:
each (token, kv head) vector becomes one row (codes and the vector's norm, or affine codes, scales
and biases). The ring, growth, trim/rollback, key positions and state save/load are the plain
caches' own, unchanged. `update_and_fetch` encodes the new tokens (the only encoder) and returns
`Packed` rows that attention reads directly (`quantized_attention`); KV-shared layers receive their
producer's `Packed` rows and attend to them the same way.

`KVQuantConfig` is the one object callers pass around (API, CLI, server):
    KVQuantConfig("turboquant", bits=4, bits_v=3)  or  KVQuantConfig("affine", bits=8)
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional, Union

import mlx.core as mx
import numpy as np

from .cache import DEFAULT_ROLLBACK, FullCache, SlidingCache
from .kernels.tq_attention import tq_attention
from .turboquant.codec import TurboQuantCodec
from .turboquant.rotation import layer_seed

SCHEMES = ("none", "turboquant", "affine")
SCHEME_BITS = {"turboquant": (2, 3, 4), "affine": (4, 8)}


@dataclass(frozen=True)
class KVQuantConfig:
    """Which KV-cache quantization every layer uses. `bits_v=None` means the same as `bits`."""

    scheme: str = "turboquant"
    bits: int = 4
    bits_v: Optional[int] = None
    seed: int = 0  # TurboQuant: the rotations' seed
    group_size: int = 64  # affine: elements a scale/bias covers (at most the head dim)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown KV quantization {self.scheme!r}: choose one of {', '.join(SCHEMES)}")
        if self.scheme == "none":
            return
        allowed = SCHEME_BITS[self.scheme]
        for name, bits in (("bits", self.bits), ("bits_v", self.value_bits)):
            if bits not in allowed:
                raise ValueError(f"{self.scheme} KV {name}={bits}: choose one of {', '.join(map(str, allowed))}")
        if self.scheme == "affine" and self.group_size not in (32, 64, 128):
            raise ValueError(f"affine group_size must be 32, 64 or 128, got {self.group_size}")

    @property
    def value_bits(self) -> int:
        return self.bits if self.bits_v is None else self.bits_v

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"

    def codecs(self, layer: int, dim: int) -> tuple:
        """(key codec, value codec) of one layer."""
        if self.scheme == "turboquant":
            return (_turboquant(dim, self.bits, layer_seed(self.seed, layer, False)),
                    _turboquant(dim, self.value_bits, layer_seed(self.seed, layer, True)))
        group = min(self.group_size, dim)
        return AffineCodec(dim, self.bits, group), AffineCodec(dim, self.value_bits, group)

    def __str__(self):
        if not self.enabled:
            return "bf16"
        bits = f"{self.bits}" if self.bits_v is None else f"{self.bits}/{self.value_bits}"
        return f"{self.scheme} {bits}"


@lru_cache(maxsize=None)
def _turboquant(dim: int, bits: int, seed: int) -> TurboQuantCodec:
    return TurboQuantCodec(dim, bits, seed)


class AffineCodec:
    """MLX's affine quantization per group of `group` elements; row = codes, float32 scales, biases."""

    def __init__(self, dim: int, bits: int, group: int):
        self.dim, self.bits, self.group = dim, bits, group
        self.words, self.groups = dim * bits // 32, dim // group

    def encode(self, x: mx.array) -> mx.array:
        codes, scales, biases = mx.quantize(x, group_size=self.group, bits=self.bits)
        scales, biases = scales.astype(mx.float32).view(mx.uint32), biases.astype(mx.float32).view(mx.uint32)
        return mx.concatenate([codes, scales, biases], axis=-1)

    def parts(self, rows: mx.array) -> tuple:
        w, g = self.words, self.groups
        return rows[..., :w], rows[..., w : w + g].view(mx.float32), rows[..., w + g :].view(mx.float32)

    def decode(self, rows: mx.array) -> mx.array:
        return mx.dequantize(*self.parts(rows), group_size=self.group, bits=self.bits)

    @property
    def bytes_per_vector(self) -> int:
        return 4 * (self.words + 2 * self.groups)


class Packed(NamedTuple):
    """Packed rows [B, HKV, S, row words] of keys or values and the codec that reads them."""

    rows: mx.array
    codec: Union[TurboQuantCodec, AffineCodec]


class _Quantized:
    """Mixin over a plain cache: encode on append, hand attention `Packed` rows."""

    def _codecs(self, key_codec, value_codec):
        self.key_codec, self.value_codec = key_codec, value_codec

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        k, v = super().update_and_fetch(self.key_codec.encode(keys), self.value_codec.encode(values))
        return Packed(k, self.key_codec), Packed(v, self.value_codec)


class QuantizedFullCache(_Quantized, FullCache):
    def __init__(self, key_codec, value_codec, left_padding: Optional[np.ndarray] = None):
        super().__init__(left_padding=left_padding)
        self._codecs(key_codec, value_codec)


class QuantizedSlidingCache(_Quantized, SlidingCache):
    def __init__(self, key_codec, value_codec, window: int, rollback: int = DEFAULT_ROLLBACK,
                 left_padding: Optional[np.ndarray] = None):
        super().__init__(window, rollback=rollback, left_padding=left_padding)
        self._codecs(key_codec, value_codec)


def make_quantized_cache(config: KVQuantConfig, spec, window: int, left_padding=None, rollback=None):
    """The quantized cache of one KV-owning layer (`spec`: config.LayerSpec)."""
    codecs = config.codecs(spec.index, spec.head_dim)
    if not spec.is_sliding:
        return QuantizedFullCache(*codecs, left_padding=left_padding)
    extra = {} if rollback is None else {"rollback": rollback}
    return QuantizedSlidingCache(*codecs, window, left_padding=left_padding, **extra)


def quantized_attention(queries: mx.array, keys: Packed, values: Packed, scale: float, mask=None) -> mx.array:
    """Attention of [B, HQ, L, D] queries over packed keys/values (mask as the model builds it)."""
    if isinstance(keys.codec, TurboQuantCodec):
        return tq_attention(queries, keys.rows, values.rows, keys.codec, values.codec, scale, mask)
    return _affine_attention(queries, keys, values, scale, mask)


def _affine_attention(queries, keys: Packed, values: Packed, scale: float, mask) -> mx.array:
    """mlx-lm's quantized attention (two quantized matmuls), with separate key and value bits."""
    batch, n_heads, length, dim = queries.shape
    n_kv = keys.rows.shape[1]
    q = (queries.astype(mx.float32) * scale).reshape(batch, n_kv, n_heads // n_kv, length, dim)
    k_parts = [p[:, :, None] for p in keys.codec.parts(keys.rows)]
    v_parts = [p[:, :, None] for p in values.codec.parts(values.rows)]
    kc, vc = keys.codec, values.codec
    scores = mx.quantized_matmul(q, *k_parts, transpose=True, group_size=kc.group, bits=kc.bits)
    if isinstance(mask, str):
        total = scores.shape[-1]
        mask = mx.arange(total - length, total)[:, None] >= mx.arange(total)[None]
    if mask is not None:
        mask = mask if mask.ndim < 4 else mask[:, :, None]  # [B|1, 1, L, S] -> over the GQA group
        scores = mx.where(mask, scores, -mx.inf)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(weights, *v_parts, transpose=False, group_size=vc.group, bits=vc.bits)
    return out.reshape(batch, n_heads, length, dim).astype(queries.dtype)
