"""Quantized KV caches on every layer: TurboQuant (default 4/4 bits) or MLX affine (8 or 4 bits).

A quantized cache is the plain cache (cache.py) holding packed uint32 rows instead of keys/values:
each (token, kv head) vector becomes one row (codes and the vector's norm, or affine codes, scales
and biases). The ring, growth, trim/rollback, key positions and state save/load are the plain
caches' own, unchanged. `update_and_fetch` encodes the new tokens (the only encoder) and returns
`Packed` rows that attention reads directly (`quantized_attention`); KV-shared layers receive their
producer's `Packed` rows and attend to them the same way.

With `recent=R` (TurboQuant) a cache also keeps its newest R tokens' keys/values in full precision
in a small ring (cache.py's SlidingCache): every token is still encoded on append, and a query reads
a key from the ring while the key is among its R newest, from the codes once it is older. Both
prefill and decode follow that rule, so they stay equal; masks built from positions say which copy
each query reads (kernels/tq_attention.py merges the two parts).

`KVQuantConfig` is the one object callers pass around (API, CLI, server):
    KVQuantConfig("turboquant", bits=4, bits_v=3, recent=64)  or  KVQuantConfig("affine", bits=8)
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Optional, Union

import mlx.core as mx
import numpy as np

from .cache import DEFAULT_ROLLBACK, FullCache, SlidingCache
from .kernels.tq_attention import Recent, tq_attention
from .model.layers import attention_mask
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
    recent: int = 0  # TurboQuant: newest tokens also kept in full precision (0: none)

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
        if self.recent < 0 or (self.recent and self.scheme != "turboquant"):
            raise ValueError(f"recent={self.recent}: a full-precision recent window is a number of tokens >= 0, "
                             "for the turboquant scheme only")

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
        return f"{self.scheme} {bits}" + (f" + recent {self.recent}" if self.recent else "")


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
    """Packed rows [B, HKV, S, row words] of keys or values and the codec that reads them; a key
    `Packed` also carries the full-precision recent window, when there is one."""

    rows: mx.array
    codec: Union[TurboQuantCodec, AffineCodec]
    recent: Optional[Recent] = None


_WINDOW_MASKS: dict = {}  # the recent window's masks of the current step, by cache kind and state


def _ring_state(cache) -> tuple:
    """What a plain cache's key positions follow from: the offset, and for a ring its fill and write slot."""
    return cache.offset, getattr(cache, "filled", None), getattr(cache, "write", None), getattr(cache, "capacity", None)


class _Quantized:
    """Mixin over a plain cache: encode on append, hand attention `Packed` rows (and the recent window)."""

    def _codecs(self, key_codec, value_codec, recent: int, rollback: int):
        self.key_codec, self.value_codec = key_codec, value_codec
        self.recent = SlidingCache(recent, rollback=rollback) if recent else None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        if self.recent is None:
            k, v = super().update_and_fetch(self.key_codec.encode(keys), self.value_codec.encode(values))
            return Packed(k, self.key_codec), Packed(v, self.value_codec)
        packed_mask, mask = self._window_masks(keys.shape[2])
        k, v = super().update_and_fetch(self.key_codec.encode(keys), self.value_codec.encode(values))
        recent_keys, recent_values = self.recent.update_and_fetch(keys, values)
        return Packed(k, self.key_codec, Recent(recent_keys, recent_values, packed_mask, mask)), Packed(v, self.value_codec)

    def _window_masks(self, length: int) -> tuple:
        """(packed_mask, mask) of `Recent` for the next `length` tokens. Every layer of a kind has the same
        positions in a step, so the masks (host work over every cached position) are made once a step."""
        padding = None if self.left_padding is None else self.left_padding.tobytes()
        key = (type(self), _ring_state(self), _ring_state(self.recent), self.recent.window, length, padding)
        if key not in _WINDOW_MASKS:
            start, window = self.offset, self.recent.window
            packed_positions = self.key_positions(length)
            distance = np.arange(start, start + length)[:, None] - packed_positions[None]
            in_window = (distance >= 0) & (distance < window) & (packed_positions >= 0)
            recent_mask = attention_mask(start, length, self.recent.key_positions(length), window, self.left_padding)
            if len(_WINDOW_MASKS) >= 4:  # a step needs one entry per cache kind
                _WINDOW_MASKS.clear()
            _WINDOW_MASKS[key] = (mx.array(~in_window[None, None]), recent_mask)
        return _WINDOW_MASKS[key]

    def can_trim(self, count: int) -> bool:
        return super().can_trim(count) and (self.recent is None or self.recent.can_trim(min(count, self.offset)))

    def trim(self, count: int) -> int:
        if self.recent is not None and not self.recent.can_trim(min(count, self.offset)):
            raise ValueError(f"cannot roll back {count} tokens: the full-precision recent window keeps "
                             f"{self.recent.rollback} tokens of slack")
        count = super().trim(count)
        if self.recent is not None:
            self.recent.trim(count)
        return count

    def _plain(self):
        """The plain cache class this one extends (its `state` property)."""
        return next(k for k in type(self).__mro__ if k in (FullCache, SlidingCache))

    @property
    def state(self):
        state = self._plain().state.fget(self)
        return state if self.recent is None else (*state, *self.recent.state)

    @state.setter
    def state(self, value):
        if self.recent is not None:
            *value, keys, values, positions = value
            self.recent.state = (keys, values, positions)
        self._plain().state.fset(self, tuple(value))

    @property
    def nbytes(self) -> int:
        return super().nbytes + (0 if self.recent is None else self.recent.nbytes)


class QuantizedFullCache(_Quantized, FullCache):
    def __init__(self, key_codec, value_codec, recent: int = 0, rollback: int = DEFAULT_ROLLBACK,
                 left_padding: Optional[np.ndarray] = None):
        super().__init__(left_padding=left_padding)
        self._codecs(key_codec, value_codec, recent, rollback)


class QuantizedSlidingCache(_Quantized, SlidingCache):
    def __init__(self, key_codec, value_codec, window: int, recent: int = 0, rollback: int = DEFAULT_ROLLBACK,
                 left_padding: Optional[np.ndarray] = None):
        super().__init__(window, rollback=rollback, left_padding=left_padding)
        self._codecs(key_codec, value_codec, min(recent, window), rollback)


def make_quantized_cache(config: KVQuantConfig, spec, window: int, left_padding=None, rollback=None):
    """The quantized cache of one KV-owning layer (`spec`: config.LayerSpec)."""
    codecs = config.codecs(spec.index, spec.head_dim)
    extra = {} if rollback is None else {"rollback": rollback}
    if not spec.is_sliding:
        return QuantizedFullCache(*codecs, recent=config.recent, left_padding=left_padding, **extra)
    return QuantizedSlidingCache(*codecs, window, recent=config.recent, left_padding=left_padding, **extra)


def quantized_attention(queries: mx.array, keys: Packed, values: Packed, scale: float, mask=None) -> mx.array:
    """Attention of [B, HQ, L, D] queries over packed keys/values (mask as the model builds it)."""
    if isinstance(keys.codec, TurboQuantCodec):
        return tq_attention(queries, keys.rows, values.rows, keys.codec, values.codec, scale, mask, keys.recent)
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
