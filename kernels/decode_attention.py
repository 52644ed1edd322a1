"""Decode attention: one query token per sequence against its key/value cache.

    out[b, h] = softmax(scale * q[b, h] · k[b, h // G]ᵀ, over the valid keys) · v[b, h // G]

queries [B, HQ, 1, D]; keys, values [B, HKV, S, D] (G = HQ / HKV query heads share a kv head, GQA);
float accumulation whatever the input dtype (float32, float16, bfloat16). Which key slots count is
given by an optional boolean `mask` [B or 1, S] (any shape of that size, e.g. the model's
[B|1, 1, 1, S]). The mask, not the slot order, carries all of it: the ring order of a sliding cache
with its window, empty slots, left padding and per-sequence lengths of a batch. The mask is built on
the host from cache positions and costs S bytes a row against the 4·D·S bytes of keys and values.
A row with no valid key gives zeros.

Two passes, so that long global caches (D=512, up to 256K tokens) spread over the whole GPU:
1. `decode_attention_partial`: a threadgroup per (sequence, kv head, chunk of keys). Its simdgroups
   split the G query heads (HPS each) and, when G is small, the chunk's keys (NK ways). A simdgroup
   walks its keys BK at a time: each lane holds 4·D/128 dims of its heads' queries and outputs,
   scores are simd_sums, and an online softmax keeps a running max m, sum l and unnormalised output.
   Every simdgroup writes its (m, l, o) partial; keys and values are read once per kv head.
2. `decode_attention_combine`: a threadgroup per (sequence, query head) rescales the partials to
   their common max and normalises.
Cache views (FullCache hands out a prefix of a larger buffer) are read in place through strides,
never copied; rows of q, k and v must start four elements aligned, as cache rows do.
"""

import math
from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx

from .kernel import Kernel, Launcher, backend, launcher, usable

PARTIAL = r"""
    // Template: T, D, G (query heads per kv head), HPS (heads per simdgroup),
    // NK (simdgroups splitting the chunk's keys), BK (keys per step), MASKED.
    constexpr int NH = G / HPS;     // simdgroups across the kv head's query heads
    constexpr int DV = D / 128;     // lane l holds dims 128 * j + 4 * l + c, j < DV, c < 4
    constexpr float FLOOR = -1e30f; // running max before any key: finite, so m - m_new is never inf - inf
    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const int HQ = q_shape[1];
    const int HKV = k_shape[1];
    const int S = k_shape[2];
    const uint b = threadgroup_position_in_grid.z / HKV;
    const uint kvh = threadgroup_position_in_grid.z % HKV;
    const uint h0 = kvh * G + (sg % NH) * HPS;  // this simdgroup's first query head
    const int split = sg / NH;
    const int n_chunks = threadgroups_per_grid.y;
    const int chunk_id = threadgroup_position_in_grid.y;
    const int chunk = ((S + n_chunks - 1) / n_chunks + BK - 1) / BK * BK;
    const int begin = chunk_id * chunk;
    const int end = metal::min(S, begin + chunk);
    const float sc = scale[0];

    float qs[HPS][4 * DV];
    float o[HPS][4 * DV];
    float m[HPS];
    float l[HPS];
    for (int h = 0; h < HPS; h++) {
        const size_t at = b * q_strides[0] + (h0 + h) * q_strides[1] + 4 * lane;
        for (int j = 0; j < DV; j++) {
            f32x4 x = load4(q + at + 128 * j);
            qs[h][4 * j] = x.x * sc;
            qs[h][4 * j + 1] = x.y * sc;
            qs[h][4 * j + 2] = x.z * sc;
            qs[h][4 * j + 3] = x.w * sc;
        }
        for (int i = 0; i < 4 * DV; i++) {
            o[h][i] = 0.0f;
        }
        m[h] = FLOOR;
        l[h] = 0.0f;
    }

    const size_t k_row = b * k_strides[0] + kvh * k_strides[1] + 4 * lane;
    const size_t v_row = b * v_strides[0] + kvh * v_strides[1] + 4 * lane;
    const size_t mask_row = mask_shape[0] > 1 ? b * mask_strides[0] : 0;
    for (int first = begin + split * BK; first < end; first += NK * BK) {
        // BK keys' scores. Every load is issued before the first reduction, so that they overlap:
        // keys past `end` re-read the last key (in bounds) and, like masked keys, count as invalid.
        float s[BK][HPS];  // scores, then softmax weights
        bool valid[BK];
#pragma unroll
        for (int t = 0; t < BK; t++) {
            const int key = metal::min(first + t, end - 1);
            valid[t] = first + t < end && (!MASKED || mask[mask_row + key * mask_strides[1]]);
            for (int h = 0; h < HPS; h++) {
                s[t][h] = 0.0f;
            }
            for (int j = 0; j < DV; j++) {
                f32x4 x = load4(k + k_row + key * k_strides[2] + 128 * j);
                for (int h = 0; h < HPS; h++) {
                    s[t][h] += qs[h][4 * j] * x.x + qs[h][4 * j + 1] * x.y + qs[h][4 * j + 2] * x.z +
                               qs[h][4 * j + 3] * x.w;
                }
            }
        }
#pragma unroll
        for (int t = 0; t < BK; t++) {
            for (int h = 0; h < HPS; h++) {
                s[t][h] = simd_sum(s[t][h]);
            }
        }
        for (int h = 0; h < HPS; h++) {
            float m_new = m[h];
            for (int t = 0; t < BK; t++) {
                if (valid[t]) {
                    m_new = metal::max(m_new, s[t][h]);
                }
            }
            const float rescale = metal::exp(m[h] - m_new);
            m[h] = m_new;
            l[h] *= rescale;
            for (int i = 0; i < 4 * DV; i++) {
                o[h][i] *= rescale;
            }
            for (int t = 0; t < BK; t++) {
                s[t][h] = valid[t] ? metal::exp(s[t][h] - m_new) : 0.0f;
                l[h] += s[t][h];
            }
        }
#pragma unroll
        for (int t = 0; t < BK; t++) {
            const int key = metal::min(first + t, end - 1);
            for (int j = 0; j < DV; j++) {
                f32x4 x = load4(v + v_row + key * v_strides[2] + 128 * j);
                if (!valid[t]) {
                    x = f32x4{0.0f, 0.0f, 0.0f, 0.0f};  // a masked slot may hold anything, NaN included
                }
                for (int h = 0; h < HPS; h++) {
                    o[h][4 * j] += s[t][h] * x.x;
                    o[h][4 * j + 1] += s[t][h] * x.y;
                    o[h][4 * j + 2] += s[t][h] * x.z;
                    o[h][4 * j + 3] += s[t][h] * x.w;
                }
            }
        }
    }

    const int parts = n_chunks * NK;
    for (int h = 0; h < HPS; h++) {
        const size_t at = (size_t(b) * HQ + h0 + h) * parts + chunk_id * NK + split;
        for (int j = 0; j < DV; j++) {
            for (int c = 0; c < 4; c++) {
                o_part[at * D + 128 * j + 4 * lane + c] = o[h][4 * j + c];
            }
        }
        if (lane == 0) {
            ml[2 * at] = m[h];
            ml[2 * at + 1] = l[h];
        }
    }
"""

COMBINE = r"""
    // Template: T (output dtype), D, NT (threads per threadgroup), MAX_P (most partials a row).
    const uint t = thread_index_in_threadgroup;
    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint row = threadgroup_position_in_grid.y;  // b * HQ + query head
    const int parts = ml_shape[1];
    const size_t first = size_t(row) * parts;
    threadgroup float weight[MAX_P];
    threadgroup float across[NT / 32];

    float m = -1e30f;  // the partial pass's floor
    for (int p = t; p < parts; p += NT) {
        m = metal::max(m, ml[2 * (first + p)]);
    }
    m = simd_max(m);
    if (lane == 0) {
        across[sg] = m;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float m_all = across[0];
    for (int i = 1; i < NT / 32; i++) {
        m_all = metal::max(m_all, across[i]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // every thread has read `across` before its reuse

    float l = 0.0f;
    for (int p = t; p < parts; p += NT) {
        const float w = metal::exp(ml[2 * (first + p)] - m_all);
        weight[p] = w;
        l += w * ml[2 * (first + p) + 1];
    }
    l = simd_sum(l);
    if (lane == 0) {
        across[sg] = l;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float l_all = 0.0f;
    for (int i = 0; i < NT / 32; i++) {
        l_all += across[i];
    }

    for (int d = t; d < D; d += NT) {
        float acc = 0.0f;
        for (int p = 0; p < parts; p++) {
            acc += weight[p] * o_part[(first + p) * D + d];
        }
        out[size_t(row) * D + d] = static_cast<T>(l_all > 0.0f ? acc / l_all : 0.0f);
    }
"""

partial_kernel = Kernel(
    name="decode_attention_partial",
    source=PARTIAL,
    inputs=["q", "k", "v", "mask", "scale"],
    outputs=["o_part", "ml"],
    row_contiguous=False,
)
combine_kernel = Kernel(
    name="decode_attention_combine",
    source=COMBINE,
    inputs=["o_part", "ml"],
    outputs=["out"],
)

BK = 4  # keys a simdgroup scores before one softmax update (H100 by GPU time: 24 against 28 us at 8, 31B sliding
# 1055 keys; 57 against 90 at 8192: benchmarks/results/decode_timeline.md)
HEAD_DIMS_PER_SIMDGROUP = 1024  # HPS * D: the per-lane query and output registers, 2 * HPS * D / 32
MIN_SIMDGROUPS = 4  # per threadgroup
TARGET_THREADGROUPS = 512  # enough to fill an H100 (132 SMs) or an M-series Max; more only adds partials
MIN_CHUNK = 64  # keys per threadgroup: fewer would make the partials outweigh the keys
MAX_PARTIALS = 1024  # partials a row, the combine pass's threadgroup array
COMBINE_THREADS = 128
DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def reference(queries, keys, values, scale: float = 1.0, mask: Optional[mx.array] = None) -> mx.array:
    """The definition, in MLX ops and float32."""
    batch, n_heads, _, dim = queries.shape
    n_kv, length = keys.shape[1], keys.shape[2]
    q = queries.astype(mx.float32).reshape(batch, n_kv, n_heads // n_kv, 1, dim) * scale
    k = keys.astype(mx.float32)[:, :, None]
    v = values.astype(mx.float32)[:, :, None]
    scores = (q @ k.swapaxes(-1, -2))[..., 0, :]  # [B, HKV, G, S]
    valid = mx.ones((1, 1, 1, length), mx.bool_) if mask is None else mask.reshape(-1, 1, 1, length)
    weights = mx.where(valid, mx.exp(scores - mx.max(mx.where(valid, scores, -mx.inf), -1, keepdims=True)), 0.0)
    total = weights.sum(-1, keepdims=True)
    out = (weights[..., None, :] @ v)[..., 0, :] / mx.where(total > 0, total, 1.0)
    return out.reshape(batch, n_heads, 1, dim).astype(queries.dtype)


def supports(queries, keys, values, mask=None) -> bool:
    """Shapes and dtypes the kernels take; anything else goes to the reference."""
    return _supported_signature(queries, keys, values, mask) and _mask_fits(queries, keys, mask)


def _supported_signature(queries, keys, values, mask) -> bool:
    batch, n_heads, length, dim = queries.shape
    return (
        length == 1
        and dim % 128 == 0
        and keys.shape[3] == dim
        and n_heads % keys.shape[1] == 0
        and queries.dtype in DTYPES
        and keys.dtype == values.dtype == queries.dtype
        and (mask is None or mask.dtype == mx.bool_)
    )


def _mask_fits(queries, keys, mask) -> bool:
    return mask is None or mask.size in (keys.shape[2], queries.shape[0] * keys.shape[2])


def decode_attention(queries, keys, values, scale: float = 1.0, mask: Optional[mx.array] = None) -> mx.array:
    """[B, HQ, 1, D] attention outputs on this device's kernel, or the reference (see module doc)."""
    run = plan(queries, keys, values, mask)
    return run(queries, keys, values, scale, mask) if run else reference(queries, keys, values, scale, mask)


# A decode step is bound by host time on MLX's CUDA backend and calls this once per layer, so the checks
# and launch arithmetic are done once per signature: (backend, launcher, query shape and dtype, kv heads,
# head dim, dtypes, mask or not). The key count is not part of it (a growing cache keeps its plan); only
# the mask's size is checked per call. The launcher is, so that a swapped one (the benchmarks' stand-in)
# gets plans of its own. A failed probe is not cached here: `usable` remembers it.
Plan = Callable[..., mx.array]  # run(queries, keys, values, scale, mask) -> outputs
_plans: dict = {}


def plan(queries, keys, values, mask: Optional[mx.array] = None) -> Optional[Plan]:
    """The kernel call for inputs like these on this backend, or None where the reference serves. The
    first plan of a configuration probes it on the device (`usable`): call this outside mx.compile."""
    on = backend()
    if on == "reference":
        return None
    signature = (on, launcher, queries.shape, queries.dtype, keys.shape[1], keys.shape[3], keys.dtype, values.dtype,
                 None if mask is None else mask.dtype)
    run = _plans.get(signature, False)
    if run is False:
        run = None
        if _supported_signature(queries, keys, values, mask):
            config = (on, queries.dtype, queries.shape[3], queries.shape[1] // keys.shape[1], mask is not None)
            if not usable(("decode_attention", *config), lambda: _probe(*config)):
                return None  # `usable` keeps this verdict (and the tests reset it), not the plans
            batch, n_heads, _, dim = queries.shape
            run = _launches(launcher(on), batch, n_heads, keys.shape[1], dim, queries.dtype, mask is not None)
        _plans[signature] = run
    return run if run is not None and _mask_fits(queries, keys, mask) else None


def attend(launch: Launcher, queries, keys, values, scale: float = 1.0, mask: Optional[mx.array] = None):
    """The kernel path: both passes through `launch` (a GPU backend, or the tests' CPU emulator)."""
    batch, n_heads, _, dim = queries.shape
    run = _launches(launch, batch, n_heads, keys.shape[1], dim, queries.dtype, mask is not None)
    return run(queries, keys, values, scale, mask)


def _launches(launch: Launcher, batch: int, n_heads: int, n_kv: int, dim: int, dtype, masked: bool) -> Plan:
    """Both passes for inputs of this signature, worked out but for what depends on the key count."""
    per_simdgroup = _heads_per_simdgroup(n_heads // n_kv, dim)
    head_groups = n_heads // n_kv // per_simdgroup
    splits = max(1, MIN_SIMDGROUPS // head_groups)
    most_chunks = min(-(-TARGET_THREADGROUPS // (batch * n_kv)), MAX_PARTIALS // splits)
    threads = 32 * head_groups * splits
    partial_template = [
        ("T", dtype),
        ("D", dim),
        ("G", n_heads // n_kv),
        ("HPS", per_simdgroup),
        ("NK", splits),
        ("BK", BK),
        ("MASKED", masked),
    ]
    combine = dict(
        template=[("T", dtype), ("D", dim), ("NT", COMBINE_THREADS), ("MAX_P", MAX_PARTIALS)],
        grid=(COMBINE_THREADS, batch * n_heads, 1),
        threadgroup=(COMBINE_THREADS, 1, 1),
        output_shapes=[(batch, n_heads, 1, dim)],
        output_dtypes=[dtype],
    )

    def run(queries, keys, values, scale: float = 1.0, mask: Optional[mx.array] = None) -> mx.array:
        length = keys.shape[2]
        chunks = max(1, min(most_chunks, -(-length // MIN_CHUNK)))
        partials = chunks * splits
        o_part, ml = launch(
            partial_kernel,
            inputs=[
                queries,
                keys,
                values,
                _constant(False) if mask is None else mask.reshape(-1, length),
                _constant(float(scale)),
            ],
            template=partial_template,
            grid=(threads, chunks, batch * n_kv),
            threadgroup=(threads, 1, 1),
            output_shapes=[(batch * n_heads, partials, dim), (batch * n_heads, partials, 2)],
            output_dtypes=[mx.float32, mx.float32],
        )
        (out,) = launch(combine_kernel, inputs=[o_part, ml], **combine)
        return out

    return run


@lru_cache(maxsize=None)
def _constant(value) -> mx.array:
    """A one-element input made once, not on every call (a per-call array costs a copy to the device)."""
    return mx.array([[value]], mx.bool_) if isinstance(value, bool) else mx.array([value], mx.float32)


def _heads_per_simdgroup(group: int, dim: int, most: Optional[int] = None,
                         head_dims: int = HEAD_DIMS_PER_SIMDGROUP) -> int:
    """The largest divisor of the GQA group, at most `most`, that keeps HPS * D within `head_dims` (the
    register budget)."""
    most = group if most is None else min(group, most)
    return max(h for h in range(1, most + 1) if group % h == 0 and h * dim <= head_dims)


TOLERANCE = {mx.float32: 1e-4, mx.float16: 4e-3, mx.bfloat16: 3e-2}  # max abs error, values ~N(0, 1)


def _probe(on: str, dtype, dim: int, group: int, masked: bool) -> Optional[str]:
    """Run one small case of this configuration on the device; None when it matches the reference."""
    batch, length = 2, 3 * MIN_CHUNK + 5
    keys = mx.random.split(mx.random.key(0), 3)
    q = mx.random.normal((batch, group, 1, dim), key=keys[0]).astype(dtype)
    k = mx.random.normal((batch, 1, length, dim), key=keys[1]).astype(dtype)
    v = mx.random.normal((batch, 1, length, dim), key=keys[2]).astype(dtype)
    mask = mx.arange(length)[None] >= mx.array([[0], [7]]) if masked else None  # row 1: 7 tokens of padding
    scale = 1 / math.sqrt(dim)
    got = attend(launcher(on), q, k, v, scale, mask).astype(mx.float32)
    error = mx.abs(got - reference(q, k, v, scale, mask).astype(mx.float32)).max().item()
    return None if error <= TOLERANCE[dtype] else f"max error {error:.3g} > {TOLERANCE[dtype]}"
