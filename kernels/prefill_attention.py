"""Prefill attention: a chunk of L queries per sequence against its S cached keys (S >= L), causal.

    out[b, h, i] = softmax(scale * q[b, h, i] · k[b, h // G]ᵀ, over the keys row i may see) · v[b, h // G]

queries [B, HQ, L, D]; keys, values [B, HKV, S, D], GQA with G = HQ / HKV; float accumulation whatever
the input dtype. The keys are in temporal order and end at the chunk's last query, as FullCache and
SlidingCache return them for a multi-token update, so which keys query i sees follows from positions
alone, with no L×S mask: key j is at distance S - L + i - j before it, and row i sees

    j <= S - L + i                         (causal, MLX's lower-right "causal")
    j >  S - L + i - window                (sliding layers; window None: no bound)
    j >= first_key[b] or j == S - L + i    (left padding: a padding query still sees itself)

`first_key` [B] int32 is each sequence's first non-padding key (the model's left padding minus the
position of key 0).

One pass: a threadgroup per (sequence, kv head, tile of rows), a row being one (query, head) pair of
that kv head, ordered query-major so that a tile spans few queries and the G heads of a query share
every key and value load. Each simdgroup owns RS rows; lane l holds dims 128 * j + 4 * l + c of its
rows' queries and outputs (as in decode_attention); scores are simd_sums and an online softmax keeps a
running max m, sum l and unnormalised output per row. A simdgroup walks only the keys its rows see.
"""

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import mlx.core as mx
import numpy as np

from .kernel import Kernel, Launcher, backend, launcher, usable

PREFILL = r"""
    // Template: T, D, G (query heads per kv head), RS (rows per simdgroup), SGS (simdgroups per
    // threadgroup), BK (keys per step), WINDOW (0: no window).
    constexpr int DV = D / 128;
    constexpr float FLOOR = -1e30f;  // running max before any key: finite, so m - m_new is never inf - inf
    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const int HQ = q_shape[1];
    const int L = q_shape[2];
    const int HKV = k_shape[1];
    const int S = k_shape[2];
    const int rows = G * L;
    const uint b = threadgroup_position_in_grid.z / HKV;
    const uint kvh = threadgroup_position_in_grid.z % HKV;
    const int row0 = (threadgroup_position_in_grid.y * SGS + sg) * RS;
    const int first_valid = first_key[b];
    const float sc = scale[0];

    // Rows past the last one repeat it (their results are not stored): simd_sums stay uniform.
    int head[RS], query[RS], lo[RS], hi[RS];
    int begin = S, end = 0;
    for (int r = 0; r < RS; r++) {
        const int row = metal::min(row0 + r, rows - 1);
        query[r] = row / G;
        head[r] = kvh * G + row % G;
        hi[r] = S - L + query[r];  // the query's own key
        lo[r] = WINDOW > 0 ? metal::max(0, hi[r] - WINDOW + 1) : 0;
        lo[r] = hi[r] < first_valid ? hi[r] : metal::max(lo[r], first_valid);
        begin = metal::min(begin, lo[r]);
        end = metal::max(end, hi[r] + 1);
    }

    float qs[RS][4 * DV];
    float o[RS][4 * DV];
    float m[RS];
    float l[RS];
    for (int r = 0; r < RS; r++) {
        const size_t at = b * q_strides[0] + head[r] * q_strides[1] + query[r] * q_strides[2] + 4 * lane;
        for (int j = 0; j < DV; j++) {
            f32x4 x = load4(q + at + 128 * j);
            qs[r][4 * j] = x.x * sc;
            qs[r][4 * j + 1] = x.y * sc;
            qs[r][4 * j + 2] = x.z * sc;
            qs[r][4 * j + 3] = x.w * sc;
        }
        for (int i = 0; i < 4 * DV; i++) {
            o[r][i] = 0.0f;
        }
        m[r] = FLOOR;
        l[r] = 0.0f;
    }

    const size_t k_row = b * k_strides[0] + kvh * k_strides[1] + 4 * lane;
    const size_t v_row = b * v_strides[0] + kvh * v_strides[1] + 4 * lane;
    for (int first = begin; first < end; first += BK) {
        // BK keys' scores, every load issued before the first reduction; keys past `end` re-read the
        // last key (in bounds) and, like keys outside a row's range, count as invalid.
        float s[BK][RS];  // scores, then softmax weights
#pragma unroll
        for (int t = 0; t < BK; t++) {
            const int key = metal::min(first + t, end - 1);
            for (int r = 0; r < RS; r++) {
                s[t][r] = 0.0f;
            }
            for (int j = 0; j < DV; j++) {
                f32x4 x = load4(k + k_row + key * k_strides[2] + 128 * j);
                for (int r = 0; r < RS; r++) {
                    s[t][r] += qs[r][4 * j] * x.x + qs[r][4 * j + 1] * x.y + qs[r][4 * j + 2] * x.z +
                               qs[r][4 * j + 3] * x.w;
                }
            }
        }
#pragma unroll
        for (int t = 0; t < BK; t++) {
            for (int r = 0; r < RS; r++) {
                s[t][r] = simd_sum(s[t][r]);
            }
        }
        for (int r = 0; r < RS; r++) {
            float m_new = m[r];
            for (int t = 0; t < BK; t++) {
                if (first + t >= lo[r] && first + t <= hi[r]) {
                    m_new = metal::max(m_new, s[t][r]);
                }
            }
            const float rescale = metal::exp(m[r] - m_new);
            m[r] = m_new;
            l[r] *= rescale;
            for (int i = 0; i < 4 * DV; i++) {
                o[r][i] *= rescale;
            }
            for (int t = 0; t < BK; t++) {
                s[t][r] = first + t >= lo[r] && first + t <= hi[r] ? metal::exp(s[t][r] - m_new) : 0.0f;
                l[r] += s[t][r];
            }
        }
#pragma unroll
        for (int t = 0; t < BK; t++) {
            const int key = metal::min(first + t, end - 1);
            for (int j = 0; j < DV; j++) {
                f32x4 x = load4(v + v_row + key * v_strides[2] + 128 * j);
                for (int r = 0; r < RS; r++) {
                    // a key outside the row's range has weight 0, but may hold anything, NaN included
                    const bool seen = s[t][r] > 0.0f;
                    o[r][4 * j] += seen ? s[t][r] * x.x : 0.0f;
                    o[r][4 * j + 1] += seen ? s[t][r] * x.y : 0.0f;
                    o[r][4 * j + 2] += seen ? s[t][r] * x.z : 0.0f;
                    o[r][4 * j + 3] += seen ? s[t][r] * x.w : 0.0f;
                }
            }
        }
    }

    for (int r = 0; r < RS; r++) {
        if (row0 + r < rows) {
            const size_t at = ((size_t(b) * HQ + head[r]) * L + query[r]) * D + 4 * lane;
            const float norm = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
            for (int j = 0; j < DV; j++) {
                out[at + 128 * j] = static_cast<T>(o[r][4 * j] * norm);
                out[at + 128 * j + 1] = static_cast<T>(o[r][4 * j + 1] * norm);
                out[at + 128 * j + 2] = static_cast<T>(o[r][4 * j + 2] * norm);
                out[at + 128 * j + 3] = static_cast<T>(o[r][4 * j + 3] * norm);
            }
        }
    }
"""


kernel = Kernel(
    name="prefill_attention",
    source=PREFILL,
    inputs=["q", "k", "v", "first_key", "scale"],
    outputs=["out"],
    row_contiguous=False,
)

BK = 8  # keys a simdgroup scores before one softmax update
HEAD_DIMS_PER_SIMDGROUP = 1024  # RS * D: the per-lane query and output registers, 2 * RS * D / 32
SIMDGROUPS = 4  # per threadgroup
DTYPES = (mx.float32, mx.float16, mx.bfloat16)


@dataclass(frozen=True, eq=False)
class CausalMask:
    """The mask of a prefill chunk, as rules rather than an L×S array (see the module doc).

    `first_key` [B] int32: each sequence's first non-padding key, or None for no padding.
    """

    window: Optional[int] = None
    first_key: Optional[mx.array] = None

    @classmethod
    def of_chunk(cls, first_position: int, window: Optional[int], left_padding: Optional[np.ndarray]) -> "CausalMask":
        """The mask of a chunk whose key 0 is at `first_position` (a cache's `key_positions(L)[0]`)."""
        padding = None if left_padding is None else mx.array(np.asarray(left_padding) - first_position, mx.int32)
        return cls(window, padding)

    def dense(self, length: int, keys: int) -> mx.array:
        """The same mask as a boolean array [B or 1, 1, L, S], for MLX's own attention."""
        own = mx.arange(keys - length, keys)[:, None]  # each query's own key
        key = mx.arange(keys)[None]
        mask = key <= own
        if self.window is not None:
            mask = mask & (key > own - self.window)
        if self.first_key is None:
            return mask[None, None]
        return (mask & (key >= self.first_key[:, None, None]) | (key == own))[:, None]


def reference(queries, keys, values, scale: float = 1.0, mask: CausalMask = CausalMask()) -> mx.array:
    """The definition, in MLX ops and float32."""
    batch, n_heads, length, dim = queries.shape
    n_kv, n_keys = keys.shape[1], keys.shape[2]
    q = queries.astype(mx.float32).reshape(batch, n_kv, n_heads // n_kv, length, dim) * scale
    k = keys.astype(mx.float32)[:, :, None]
    v = values.astype(mx.float32)[:, :, None]
    scores = q @ k.swapaxes(-1, -2)  # [B, HKV, G, L, S]
    valid = mask.dense(length, n_keys)[:, :, None]
    weights = mx.where(valid, mx.exp(scores - mx.max(mx.where(valid, scores, -mx.inf), -1, keepdims=True)), 0.0)
    out = (weights @ v) / weights.sum(-1, keepdims=True)  # every row sees at least its own key
    return out.reshape(batch, n_heads, length, dim).astype(queries.dtype)


def supports(queries, keys, values, mask: CausalMask = CausalMask()) -> bool:
    """Shapes and dtypes the kernel takes; anything else goes to the reference."""
    batch, n_heads, length, dim = queries.shape
    return (
        dim % 128 == 0
        and keys.shape[3] == dim
        and values.shape == keys.shape
        and keys.shape[0] == batch
        and keys.shape[2] >= length
        and n_heads % keys.shape[1] == 0
        and queries.dtype in DTYPES
        and keys.dtype == values.dtype == queries.dtype
        and (mask.window is None or mask.window > 0)
        and (mask.first_key is None or mask.first_key.shape == (batch,))
    )


def prefill_attention(queries, keys, values, scale: float = 1.0, mask: CausalMask = CausalMask()) -> mx.array:
    """[B, HQ, L, D] attention outputs on this device's kernel, or the reference (see module doc)."""
    on = backend()
    if on != "reference" and supports(queries, keys, values, mask):
        config = (on, queries.dtype, queries.shape[3], queries.shape[1] // keys.shape[1], mask.window)
        if usable(("prefill_attention", *config), lambda: _probe(*config)):
            return attend(launcher(on), queries, keys, values, scale, mask)
    return reference(queries, keys, values, scale, mask)


def attend(launch: Launcher, queries, keys, values, scale: float = 1.0, mask: CausalMask = CausalMask()):
    """The kernel path through `launch` (a GPU backend, or the tests' CPU emulator)."""
    batch, n_heads, length, dim = queries.shape
    n_kv = keys.shape[1]
    group = n_heads // n_kv
    per_simdgroup = max(1, HEAD_DIMS_PER_SIMDGROUP // dim)
    tiles = -(-group * length // (per_simdgroup * SIMDGROUPS))
    first_key = _no_padding(batch) if mask.first_key is None else mask.first_key.astype(mx.int32)
    (out,) = launch(
        kernel,
        inputs=[queries, keys, values, first_key, _scale(float(scale))],
        template=[
            ("T", queries.dtype),
            ("D", dim),
            ("G", group),
            ("RS", per_simdgroup),
            ("SGS", SIMDGROUPS),
            ("BK", BK),
            ("WINDOW", mask.window or 0),
        ],
        grid=(32 * SIMDGROUPS, tiles, batch * n_kv),
        threadgroup=(32 * SIMDGROUPS, 1, 1),
        output_shapes=[(batch, n_heads, length, dim)],
        output_dtypes=[queries.dtype],
    )
    return out


@lru_cache(maxsize=None)
def _no_padding(batch: int) -> mx.array:
    """A constant input made once (a per-call array costs a copy to the device)."""
    return mx.zeros((batch,), mx.int32)


@lru_cache(maxsize=None)
def _scale(value: float) -> mx.array:
    return mx.array([value], mx.float32)


TOLERANCE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}  # max abs error, values ~N(0, 1)


def _probe(on: str, dtype, dim: int, group: int, window: Optional[int]) -> Optional[str]:
    """Run one small case of this configuration on the device; None when it matches the reference."""
    batch, length, n_keys = 2, 37, 101
    keys = mx.random.split(mx.random.key(0), 3)
    q = mx.random.normal((batch, group, length, dim), key=keys[0]).astype(dtype)
    k = mx.random.normal((batch, 1, n_keys, dim), key=keys[1]).astype(dtype)
    v = mx.random.normal((batch, 1, n_keys, dim), key=keys[2]).astype(dtype)
    mask = CausalMask(window, mx.array([0, 70], mx.int32))  # row 1: padding past some queries' own keys
    scale = 1 / math.sqrt(dim)
    got = attend(launcher(on), q, k, v, scale, mask).astype(mx.float32)
    with mx.stream(mx.cpu):  # MLX's CUDA float32 matmuls round through TF32, past the float32 tolerance
        want = reference(q, k, v, scale, mask).astype(mx.float32)
    error = mx.abs(got - want).max().item()
    return None if error <= TOLERANCE[dtype] else f"max error {error:.3g} > {TOLERANCE[dtype]}"
