"""Attention on TurboQuant-packed keys and values (decode: one query token; prefill: the reference).

With R_k, R_v the layers' rotations (turboquant/rotation.py), a packed row holding codes and ‖x‖:

    q'  = scale · R_k·q                                   (once per step and threadgroup)
    s_t = ‖k_t‖ · Σ_j q'_j · c_k[code_k(t, j)]            (scores straight from the codes)
    o'  = Σ_t softmax(s)_t · ‖v_t‖ · c_v[code_v(t, j)]    (values summed in the rotated basis)
    out = R_vᵀ·o'                                          (one inverse rotation per output)

queries [B, HQ, L, D]; rows [B, HKV, S, words + 1] uint32 (GQA as in decode_attention); `mask` as the
model builds it (None, "causal", or a boolean [B|1, 1, L, S] array).

The decode kernel follows decode_attention.py: `tq_attention_partial` is a threadgroup per (sequence,
kv head, chunk of keys); it first rotates its kv head's G queries in threadgroup memory (the encoder's
butterflies), then lane l holds the D/32 consecutive rotated coordinates l·D/32.. of its heads'
queries and outputs and reads exactly those bits of each packed row (coalesced; the two codebooks
sit in threadgroup memory); an online softmax keeps (m, l, o') per simdgroup. `tq_attention_combine`
merges the partials as decode_attention's combine pass does and applies R_vᵀ in threadgroup memory;
with a full-precision recent window (`Recent`) it also attends those few keys itself, one more partial.
A decode step is thus two kernel calls and no MLX arithmetic, with or without the window: on a GPU
the step is host-bound and every MLX op costs microseconds (benchmarks/kv_quant_step_ops.py counts
them). Prefill (L > 1) and the CPU take the reference, which dequantizes the rotated keys and values
a tile at a time.

The partial pass's launch geometry (`Geometry`: query heads a simdgroup scores, the fewest keys a
threadgroup walks, the threadgroups a long cache spreads over) comes from `LAUNCH_SHAPES` per backend,
layout and key count (benchmarks/tq_launch_sweep.py measures it); a plan holds one launch per geometry
its layout's rules name and picks among them by the key count with a comparison per rule.
"""

import math
from functools import lru_cache
from typing import NamedTuple, Optional, Union

import mlx.core as mx

from .decode_attention import (
    BK,
    COMBINE_THREADS,
    MAX_PARTIALS,
    MIN_CHUNK,
    MIN_SIMDGROUPS,
    TARGET_THREADGROUPS,
    _constant,
    _heads_per_simdgroup,
)
from .kernel import Kernel, Launcher, backend, launcher, usable

PARTIAL = r"""
    // Template: T (query dtype), D, G, HPS, NK, BK, KB, VB (key and value bits), MASKED, HIDDEN.
    // MASKED: mask [B|1, S] says which keys the query sees; HIDDEN: so does the last query row of
    // hidden [B|1, 1, L, S] (Recent.packed_mask: the packed copies of the recent window are hidden).
    constexpr int NH = G / HPS;
    constexpr int N = D / 32;       // lane l holds rotated coordinates l * N .. l * N + N - 1
    constexpr int WK = KB == 4 ? D / 8 : (KB == 2 ? D / 16 : D / 16 + D / 32);  // words before the norm
    constexpr int WV = VB == 4 ? D / 8 : (VB == 2 ? D / 16 : D / 16 + D / 32);
    constexpr float FLOOR = -1e30f;
// The lane's c-th W-bit field of the plane at word `at` of a packed row (turboquant/packing.py): the
// lane's N·W bits start at bit lane·N·W, a word's start or inside one word (D is a power of two), so
// with c a constant every word index and shift but the lane's own is known to the compiler.
#define TQ_FIELD(row, at, W, c)                                                                     \
    (((row)[(at) + lane * (N * (W)) / 32 + (c) * (W) / 32] >> (lane * (N * (W)) % 32 + (c) * (W) % 32)) & \
     ((1u << (W)) - 1u))
// code c of the lane: 3 bits as a 2-bit and a 1-bit plane
#define TQ_CODE(row, B, c) \
    ((B) == 3 ? (TQ_FIELD(row, 0, 2, c) | (TQ_FIELD(row, D / 16, 1, c) << 2)) : TQ_FIELD(row, 0, B, c))
    threadgroup float lut[32];  // key codebook at 0, value codebook at 16
    threadgroup float rotated[G * D];  // the kv head's G queries, rotated into the keys' basis
    const uint t_id = thread_index_in_threadgroup;
    const uint threads = 32 * NH * NK;
    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    if (t_id < (1u << KB)) {
        lut[t_id] = k_lut[t_id];
    }
    if (t_id < (1u << VB)) {
        lut[16 + t_id] = v_lut[t_id];
    }

    const int HQ = q_shape[1];
    const int HKV = k_shape[1];
    const int S = k_shape[2];
    const uint b = threadgroup_position_in_grid.z / HKV;
    const uint kvh = threadgroup_position_in_grid.z % HKV;
    // q' = scale · H·diag(s)·q / √D: signs on load, then butterflies, lowest stride first
    for (uint i = t_id; i < G * D; i += threads) {
        const uint head = kvh * G + i / D;
        rotated[i] = static_cast<float>(q[b * q_strides[0] + head * q_strides[1] + (i % D) * q_strides[3]]) * q_sign[i % D];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int h = 1; h < D; h <<= 1) {
        for (uint p = t_id; p < G * D / 2; p += threads) {
            const int within = p % (D / 2);
            const int i = (p / (D / 2)) * D + (within / h) * 2 * h + within % h;
            const float a = rotated[i];
            const float c = rotated[i + h];
            rotated[i] = a + c;
            rotated[i + h] = a - c;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    // scores in log2 units, so that the softmax takes exp2 (one instruction on CUDA, expf's range
    // reduction around it otherwise); m goes back to natural units when the partial is written
    const float q_factor = q_scale[0] * 1.44269504f;
    const uint h0 = kvh * G + (sg % NH) * HPS;
    const int split = sg / NH;
    const int n_chunks = threadgroups_per_grid.y;
    const int chunk_id = threadgroup_position_in_grid.y;
    const int chunk = ((S + n_chunks - 1) / n_chunks + BK - 1) / BK * BK;
    const int begin = chunk_id * chunk;
    const int end = metal::min(S, begin + chunk);

    float qs[HPS][N];
    float o[HPS][N];
    float m[HPS];
    float l[HPS];
    for (int h = 0; h < HPS; h++) {
        for (int c = 0; c < N; c++) {
            qs[h][c] = rotated[(h0 - kvh * G + h) * D + lane * N + c] * q_factor;
            o[h][c] = 0.0f;
        }
        m[h] = FLOOR;
        l[h] = 0.0f;
    }

    const size_t k_head = b * k_strides[0] + kvh * k_strides[1];
    const size_t v_head = b * v_strides[0] + kvh * v_strides[1];
    const size_t mask_row = mask_shape[0] > 1 ? b * mask_strides[0] : 0;
    const size_t hidden_row =
        HIDDEN ? (hidden_shape[0] > 1 ? b * hidden_strides[0] : 0) + (hidden_shape[2] - 1) * hidden_strides[2] : 0;
    for (int first = begin + split * BK; first < end; first += NK * BK) {
        float s[BK][HPS];
        bool valid[BK];
#pragma unroll
        for (int t = 0; t < BK; t++) {
            const int key = metal::min(first + t, end - 1);
            valid[t] = first + t < end && (!MASKED || mask[mask_row + key * mask_strides[1]]) &&
                       (!HIDDEN || hidden[hidden_row + key * hidden_strides[3]]);
            const size_t row = k_head + key * k_strides[2];
            for (int h = 0; h < HPS; h++) {
                s[t][h] = 0.0f;
            }
            for (int c = 0; c < N; c++) {
                const float x = lut[TQ_CODE(k + row, KB, c)];
                for (int h = 0; h < HPS; h++) {
                    s[t][h] += qs[h][c] * x;
                }
            }
        }
#pragma unroll
        for (int t = 0; t < BK; t++) {
            const int key = metal::min(first + t, end - 1);
            // the norm word through its own view's strides (MLX may have copied the float view)
            const float norm = k_norm[b * k_norm_strides[0] + kvh * k_norm_strides[1] + key * k_norm_strides[2] + WK];
            for (int h = 0; h < HPS; h++) {
                s[t][h] = simd_sum(s[t][h]) * norm;
            }
        }
        for (int h = 0; h < HPS; h++) {
            float m_new = m[h];
            for (int t = 0; t < BK; t++) {
                if (valid[t]) {
                    m_new = metal::max(m_new, s[t][h]);
                }
            }
            const float rescale = metal::exp2(m[h] - m_new);
            m[h] = m_new;
            l[h] *= rescale;
            for (int c = 0; c < N; c++) {
                o[h][c] *= rescale;
            }
            for (int t = 0; t < BK; t++) {
                s[t][h] = valid[t] ? metal::exp2(s[t][h] - m_new) : 0.0f;
                l[h] += s[t][h];
            }
        }
#pragma unroll
        for (int t = 0; t < BK; t++) {
            const int key = metal::min(first + t, end - 1);
            const size_t row = v_head + key * v_strides[2];
            // a masked slot may hold anything, NaN norms included: it contributes nothing
            const size_t norm_at = b * v_norm_strides[0] + kvh * v_norm_strides[1] + key * v_norm_strides[2] + WV;
            const float norm = valid[t] ? v_norm[norm_at] : 0.0f;
            float weight[HPS];  // the norm folded into the softmax weight: once per head, not per coordinate
            for (int h = 0; h < HPS; h++) {
                weight[h] = s[t][h] * norm;
            }
            for (int c = 0; c < N; c++) {
                const float x = lut[16 + TQ_CODE(v + row, VB, c)];
                for (int h = 0; h < HPS; h++) {
                    o[h][c] += weight[h] * x;
                }
            }
        }
    }

    const int parts = n_chunks * NK;
    for (int h = 0; h < HPS; h++) {
        const size_t at = (size_t(b) * HQ + h0 + h) * parts + chunk_id * NK + split;
        for (int c = 0; c < N; c++) {
            o_part[at * D + lane * N + c] = o[h][c];
        }
        if (lane == 0) {
            ml[2 * at] = m[h] * 0.693147181f;  // ln 2
            ml[2 * at + 1] = l[h];
        }
    }
#undef TQ_CODE
"""

partial_kernel = Kernel(
    name="tq_attention_partial",
    source=PARTIAL,
    inputs=["q", "q_sign", "q_scale", "k", "k_norm", "v", "v_norm", "mask", "hidden", "k_lut", "v_lut"],
    outputs=["o_part", "ml"],
    row_contiguous=False,
)

COMBINE = r"""
    // Template: T (output dtype), D, G, NT (threads per threadgroup), MAX_P (most partials a row), RECENT.
    // decode_attention's combine, then out = R_vᵀ·o' = diag(s)·H·o' / √D through threadgroup memory.
    // With RECENT, the full-precision recent keys r_k, r_v [B, HKV, R, D] (the original basis) are attended
    // here too: simdgroup j takes keys j, j + NT/32, .. with an online softmax of its own, and its (m, l, o)
    // joins the merge as one more partial. Visibility: the last query row of r_mask [B|1, 1, L, R].
    constexpr int NS = NT / 32;  // simdgroups
    constexpr int N = D / 32;    // lane l holds coordinates l, l + 32, .. of the recent query and output
    const uint t = thread_index_in_threadgroup;
    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint row = threadgroup_position_in_grid.y;  // b * HQ + query head
    const int parts = ml_shape[1];
    const size_t first = size_t(row) * parts;
    threadgroup float weight[MAX_P];
    threadgroup float across[NS];
    threadgroup float o[D];
    threadgroup float recent_ml[2 * NS];  // each simdgroup's recent (m, l), m in natural units
    threadgroup float recent_o[RECENT ? NS * D : 1];

    if (RECENT) {
        const int HQ = q_shape[1];
        const uint b = row / HQ;
        const uint head = row % HQ;
        const size_t q_at = b * q_strides[0] + head * q_strides[1];
        const size_t k_at = b * r_k_strides[0] + (head / G) * r_k_strides[1];
        const size_t v_at = b * r_v_strides[0] + (head / G) * r_v_strides[1];
        const size_t mask_at = (r_mask_shape[0] > 1 ? b * r_mask_strides[0] : 0) + (r_mask_shape[2] - 1) * r_mask_strides[2];
        const float q_factor = q_scale[0] * 1.44269504f;  // scores in log2 units, as the partial pass's
        float qs[N];
        float acc[N];
        for (int c = 0; c < N; c++) {
            qs[c] = static_cast<float>(q[q_at + (c * 32 + lane) * q_strides[3]]) * q_factor;
            acc[c] = 0.0f;
        }
        float rm = -1e30f;
        float rl = 0.0f;
        for (int key = sg; key < r_k_shape[2]; key += NS) {  // uniform over the simdgroup: simd_sum is safe
            if (!r_mask[mask_at + key * r_mask_strides[3]]) {
                continue;
            }
            float s = 0.0f;
            for (int c = 0; c < N; c++) {
                s += qs[c] * static_cast<float>(r_k[k_at + key * r_k_strides[2] + (c * 32 + lane) * r_k_strides[3]]);
            }
            s = simd_sum(s);
            const float m_new = metal::max(rm, s);
            const float rescale = metal::exp2(rm - m_new);
            const float p = metal::exp2(s - m_new);
            rm = m_new;
            rl = rl * rescale + p;
            for (int c = 0; c < N; c++) {
                const float x = static_cast<float>(r_v[v_at + key * r_v_strides[2] + (c * 32 + lane) * r_v_strides[3]]);
                acc[c] = acc[c] * rescale + p * x;
            }
        }
        for (int c = 0; c < N; c++) {
            recent_o[sg * D + c * 32 + lane] = acc[c];
        }
        if (lane == 0) {
            recent_ml[2 * sg] = rm * 0.693147181f;  // ln 2
            recent_ml[2 * sg + 1] = rl;
        }
    }

    float m = -1e30f;  // the partial pass's floor
    for (int p = t; p < parts; p += NT) {
        m = metal::max(m, ml[2 * (first + p)]);
    }
    m = simd_max(m);
    if (lane == 0) {
        across[sg] = m;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // also publishes recent_ml and recent_o
    float m_all = across[0];
    for (int i = 1; i < NS; i++) {
        m_all = metal::max(m_all, across[i]);
    }
    if (RECENT) {
        for (int i = 0; i < NS; i++) {
            m_all = metal::max(m_all, recent_ml[2 * i]);
        }
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
    for (int i = 0; i < NS; i++) {
        l_all += across[i];
    }
    float w_recent[NS];  // each simdgroup's recent partial in the merge
    if (RECENT) {
        for (int i = 0; i < NS; i++) {
            w_recent[i] = metal::exp(recent_ml[2 * i] - m_all);
            l_all += w_recent[i] * recent_ml[2 * i + 1];
        }
    }

    for (int d = t; d < D; d += NT) {
        float acc = 0.0f;
        for (int p = 0; p < parts; p++) {
            acc += weight[p] * o_part[(first + p) * D + d];
        }
        o[d] = acc;  // normalized after the rotation, once the recent part has joined
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int h = 1; h < D; h <<= 1) {
        for (int p = t; p < D / 2; p += NT) {
            const int i = (p / h) * 2 * h + p % h;
            const float a = o[i];
            const float c = o[i + h];
            o[i] = a + c;
            o[i + h] = a - c;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    const float factor = inv_sqrt_dim[0];
    for (int d = t; d < D; d += NT) {
        float x = o[d] * factor * v_sign[d];
        if (RECENT) {
            for (int i = 0; i < NS; i++) {
                x += w_recent[i] * recent_o[i * D + d];
            }
        }
        out[size_t(row) * D + d] = static_cast<T>(l_all > 0.0f ? x / l_all : 0.0f);
    }
"""

combine_kernel = Kernel(
    name="tq_attention_combine",
    source=COMBINE,
    inputs=["o_part", "ml", "v_sign", "inv_sqrt_dim", "q", "q_scale", "r_k", "r_v", "r_mask"],
    outputs=["out"],
    row_contiguous=False,  # the queries and the recent window through their strides; the rest is contiguous
)

Mask = Union[None, str, mx.array]
KEY_TILE = 1024  # keys the reference dequantizes at a time: float32 temporaries stay O(tile), not O(cache)
FLOOR = -1e30  # the kernel's running-max floor: a row with no visible key yet


class Recent(NamedTuple):
    """The newest keys/values in full precision ([B, HKV, R, D]), read instead of their codes.

    `packed_mask` [B|1, 1, L, S] hides the packed copies of those keys, `mask` [B|1, 1, L, R] says
    which full-precision keys each query reads (quantized_cache.py builds both from positions)."""

    keys: mx.array
    values: mx.array
    packed_mask: mx.array
    mask: mx.array


def reference(queries, k_rows, v_rows, k_codec, v_codec, scale: float = 1.0, mask: Mask = None,
              recent: Optional[Recent] = None) -> mx.array:
    """The definition in MLX ops, tile by tile over the keys with an online softmax: dequantized
    rotated keys/values (and the rotated full-precision recent ones), one inverse rotation."""
    batch, n_heads, length, dim = queries.shape
    n_kv, total = k_rows.shape[1], k_rows.shape[2]
    q = (k_codec.rotate(queries) * scale).reshape(batch, n_kv, n_heads // n_kv, length, dim)
    mask = _packed_mask(mask, recent, length, total)
    m = mx.full((batch, n_kv, n_heads // n_kv, length, 1), FLOOR, mx.float32)
    state = (m, mx.zeros_like(m), mx.zeros(q.shape, mx.float32))
    for a in range(0, total, KEY_TILE):
        # A tile's rows are read only once the previous tile's (m, l, o) exist: MLX would otherwise
        # dequantize tiles ahead and keep each tile's float32 keys, values and scores alive until the
        # last of m, l, o chains reached it (16K keys: 26 MB peak this way, 56 MB without, 64 MB whole).
        k_tile, v_tile = mx.depends([k_rows[:, :, a : a + KEY_TILE], v_rows[:, :, a : a + KEY_TILE]], list(state))
        keys, values = k_codec.decode_rotated(k_tile), v_codec.decode_rotated(v_tile)
        state = _online_softmax_step(q, keys, values, _tile(mask, a, a + KEY_TILE), *state)
    if recent is not None:
        keys, values = k_codec.rotate(recent.keys), v_codec.rotate(recent.values)
        state = _online_softmax_step(q, keys, values, recent.mask[..., -length:, :], *state)
    _, l, o = state
    out = mx.where(l > 0, o / mx.maximum(l, 1e-30), 0.0).reshape(batch, n_heads, length, dim)
    return v_codec.unrotate(out).astype(queries.dtype)


def _online_softmax_step(q, keys, values, visible, m, l, o) -> tuple:
    """(m, l, o) after one more tile of rotated keys/values [B, HKV, T, D] under `visible` [B|1, 1, L, T]."""
    scores = q @ keys[:, :, None].swapaxes(-1, -2)
    if visible is not None:
        visible = visible[:, :, None]  # [B|1, 1, 1, L, T] over the GQA group
        scores = mx.where(visible, scores, FLOOR)
    m_new = mx.maximum(m, mx.max(scores, axis=-1, keepdims=True))
    p = mx.exp(scores - m_new)
    if visible is not None:
        p = mx.where(visible, p, 0.0)  # a row with nothing visible yet keeps l = 0
    rescale = mx.exp(m - m_new)
    return m_new, l * rescale + mx.sum(p, axis=-1, keepdims=True), o * rescale + p @ values[:, :, None]


def _packed_mask(mask: Mask, recent: Optional[Recent], length: int, total: int):
    """The boolean mask [B|1, 1, L, S] or None the packed keys are read under."""
    if isinstance(mask, str):
        mask = (mx.arange(total - length, total)[:, None] >= mx.arange(total)[None])[None, None]
    if recent is None:
        return mask
    hidden = recent.packed_mask[..., -length:, :]  # KV-shared layers may keep only the last queries
    return hidden if mask is None else mask & hidden


def _tile(mask, begin: int, end: int):
    return None if mask is None else mask[..., begin:end]


# Query heads a simdgroup scores from one decode of a key's codes (every simdgroup on a key decodes them
# again): by default the largest divisor of G with HPS <= 4 and HPS·D <= 2048, so that a lane's queries and
# outputs (2·HPS·D/32 floats) and scores (BK·HPS) stay in registers. nvcc for sm_90: D=512 HPS=4 252
# registers, D=256 HPS=8 spilled (benchmarks/kernel_instructions.py).
MAX_HEADS_PER_SIMDGROUP = 4
HEAD_DIMS_PER_SIMDGROUP = 2048
MAX_ROTATED_QUERIES = 4096  # G·D floats of threadgroup memory (16 KB): Gemma 4 has G·D <= 8·512


class Geometry(NamedTuple):
    """The partial pass's launch: HPS (a template constant: one kernel build each), the fewest keys a
    threadgroup walks, and the threadgroups a long cache is spread over (both only shape the grid)."""

    heads_per_simdgroup: int
    min_chunk: int
    threadgroups: int


# The geometry by layout and key count on each backend: rules (head dim, GQA group, kv rows = batch × kv
# heads, most keys or None for no bound, HPS, MIN_CHUNK, threadgroups); a layout's rules in increasing most
# keys, the first that holds the key count wins; beyond them `default_geometry`. Filled from
# benchmarks/tq_launch_sweep.py's printed rules (CUDA: H100, benchmarks/results/tq_launch_sweep.md).
LAUNCH_SHAPES = {
    "cuda": (
        (256, 8, 1, None, 4, 128, 512),
        (512, 8, 1, 65536, 4, 128, 512),
        (256, 2, 16, None, 1, 128, 512),
        (512, 8, 4, 16384, 4, 128, 512),
    ),
    "metal": (),
    "reference": (),
}


def default_geometry(dim: int, group: int) -> Geometry:
    """The geometry where no rule applies: decode_attention's chunking, HPS within the register budget."""
    hps = _heads_per_simdgroup(group, dim, MAX_HEADS_PER_SIMDGROUP, HEAD_DIMS_PER_SIMDGROUP)
    return Geometry(hps, MIN_CHUNK, TARGET_THREADGROUPS)


def geometries(on: str, dim: int, group: int, kv_rows: int) -> tuple:
    """((most keys, Geometry), ...) for this layout on backend `on`, tried in order; the last, unbounded,
    is the default unless a rule has no bound."""
    chosen = []
    for rule_dim, rule_group, rule_rows, most, hps, min_chunk, threadgroups in LAUNCH_SHAPES[on]:
        if (rule_dim, rule_group, rule_rows) == (dim, group, kv_rows):
            geometry = _checked(Geometry(hps, min_chunk, threadgroups), dim, group)
            chosen.append((math.inf if most is None else most, geometry))
            if most is None:
                return tuple(chosen)
    return (*chosen, (math.inf, default_geometry(dim, group)))


def heads_fit(hps: int, dim: int, group: int) -> bool:
    """Whether HPS heads a simdgroup divide the GQA group and stay within the register budget."""
    return 1 <= hps <= MAX_HEADS_PER_SIMDGROUP and group % hps == 0 and hps * dim <= HEAD_DIMS_PER_SIMDGROUP


def _checked(geometry: Geometry, dim: int, group: int) -> Geometry:
    hps, min_chunk, threadgroups = geometry
    if not heads_fit(hps, dim, group) or min_chunk < 1 or threadgroups < 1:
        raise ValueError(f"TQ attention geometry {geometry} for D={dim}, G={group}: HPS must divide G with HPS <= "
                         f"{MAX_HEADS_PER_SIMDGROUP} and HPS·D <= {HEAD_DIMS_PER_SIMDGROUP}; the chunk and the "
                         "threadgroups >= 1")
    return geometry


def launch_grid(geometry: Geometry, group: int, kv_rows: int, length: int) -> tuple:
    """(simdgroups splitting a chunk's keys, chunks) of the partial pass at this key count."""
    splits, most_chunks = _split(geometry, group, kv_rows)
    return splits, max(1, min(most_chunks, -(-length // geometry.min_chunk)))


def _split(geometry: Geometry, group: int, kv_rows: int) -> tuple:
    """(NK, most chunks): at least MIN_SIMDGROUPS a threadgroup, at most MAX_PARTIALS partials a row."""
    splits = max(1, MIN_SIMDGROUPS // (group // geometry.heads_per_simdgroup))
    return splits, min(-(-geometry.threadgroups // kv_rows), MAX_PARTIALS // splits)


def supports(queries, k_rows, k_codec, v_codec, mask: Mask) -> bool:
    return (
        queries.shape[2] == 1
        and queries.dtype in (mx.float32, mx.float16, mx.bfloat16)
        and queries.shape[1] // k_rows.shape[1] * queries.shape[3] <= MAX_ROTATED_QUERIES
        and queries.shape[3] % 32 == 0
        and k_codec.dim == v_codec.dim == queries.shape[3]
        and (mask is None or isinstance(mask, str) or mask.dtype == mx.bool_)
    )


def tq_attention(queries, k_rows, v_rows, k_codec, v_codec, scale: float = 1.0, mask: Mask = None,
                 recent: Optional[Recent] = None) -> mx.array:
    """[B, HQ, L, D] attention outputs on this device's kernel (decode), or the reference."""
    run = plan(queries, k_rows, k_codec, v_codec, mask, recent)
    if run is None:
        return reference(queries, k_rows, v_rows, k_codec, v_codec, scale, mask, recent)
    decode_mask = mask if isinstance(mask, mx.array) else None  # a lone newest query: "causal" is no mask
    return run(queries, k_rows, v_rows, k_codec, v_codec, scale, decode_mask, recent)


# Plans per signature, as decode_attention's (see there): a decode step calls this once per layer.
_plans: dict = {}


def plan(queries, k_rows, k_codec, v_codec, mask: Mask, recent: Optional[Recent]):
    """The kernel call for inputs like these on this backend, run(queries, k_rows, v_rows, k_codec, v_codec,
    scale, mask array or None, recent), or None where the reference serves; probes each geometry the
    layout's rules can pick. A geometry whose probe fails leaves its keys to the next rule's."""
    on = backend()
    if on == "reference":
        return None
    signature = (on, launcher, queries.shape, queries.dtype, k_rows.shape[1], k_codec.dim, k_codec.bits, v_codec.dim,
                 v_codec.bits, mask if mask is None or isinstance(mask, str) else mask.dtype, recent is None)
    run = _plans.get(signature, False)
    if run is False:
        run = None
        if supports(queries, k_rows, k_codec, v_codec, mask):
            batch, n_heads, _, dim = queries.shape
            masked = isinstance(mask, mx.array)
            group = n_heads // k_rows.shape[1]
            config = (on, queries.dtype, dim, group, k_codec.bits, v_codec.bits, masked, recent is not None)
            variants = geometries(on, dim, group, batch * k_rows.shape[1])
            working = [(most, geometry) for most, geometry in variants
                       if usable(("tq_attention", *config, *geometry), lambda g=geometry: _probe(*config, g))]
            if not working or working[-1] != variants[-1]:
                return None  # the unbounded geometry failed: `usable` keeps the verdicts, not the plans
            runs = [(most, launch_plan(launcher(on), batch, n_heads, k_rows.shape[1], dim, queries.dtype,
                                       k_codec.bits, v_codec.bits, masked, recent is not None, geometry))
                    for most, geometry in working]
            run = _by_length(runs)
        _plans[signature] = run
    return run


def attend(launch: Launcher, queries, k_rows, v_rows, k_codec, v_codec, scale: float = 1.0,
           mask: Optional[mx.array] = None, recent: Optional[Recent] = None,
           geometry: Optional[Geometry] = None) -> mx.array:
    """The kernel path: both passes through `launch` (they rotate q and the output); the recent window,
    when there is one, is attended inside the combine pass (no MLX ops). `geometry`: the partial pass's,
    `default_geometry` when not given.

    `mask` [B|1, 1, 1, S] or None is the model's over the packed keys; the kernel hides the recent window's
    packed copies itself (`recent.packed_mask`)."""
    batch, n_heads, _, dim = queries.shape
    group = n_heads // k_rows.shape[1]
    geometry = default_geometry(dim, group) if geometry is None else _checked(geometry, dim, group)
    run = launch_plan(launch, batch, n_heads, k_rows.shape[1], dim, queries.dtype, k_codec.bits, v_codec.bits,
                      mask is not None, recent is not None, geometry)
    return run(queries, k_rows, v_rows, k_codec, v_codec, scale, mask, recent)


def _by_length(runs: list):
    """One run that hands each call to the first of `runs` [(most keys, run), ...] that holds its key count."""
    if len(runs) == 1:
        return runs[0][1]

    def run(queries, k_rows, *rest):
        length = k_rows.shape[2]
        for most, variant in runs:
            if length <= most:
                return variant(queries, k_rows, *rest)

    return run


def launch_plan(launch: Launcher, batch: int, n_heads: int, n_kv: int, dim: int, dtype, k_bits: int, v_bits: int,
                masked: bool, with_recent: bool, geometry: Geometry):
    """Both passes for inputs of this signature at this geometry, worked out but for what depends on the
    key count."""
    group = n_heads // n_kv
    head_groups = group // geometry.heads_per_simdgroup
    splits, most_chunks = _split(geometry, group, batch * n_kv)
    min_chunk = geometry.min_chunk
    threads = 32 * head_groups * splits
    partial_template = [
        ("T", dtype),
        ("D", dim),
        ("G", group),
        ("HPS", geometry.heads_per_simdgroup),
        ("NK", splits),
        ("BK", BK),
        ("KB", k_bits),
        ("VB", v_bits),
        ("MASKED", masked),
        ("HIDDEN", with_recent),
    ]
    combine = dict(
        template=[("T", dtype), ("D", dim), ("G", group), ("NT", COMBINE_THREADS), ("MAX_P", MAX_PARTIALS),
                  ("RECENT", with_recent)],
        grid=(COMBINE_THREADS, batch * n_heads, 1),
        threadgroup=(COMBINE_THREADS, 1, 1),
        output_shapes=[(batch, n_heads, 1, dim)],
        output_dtypes=[dtype],
    )
    no_recent = (_float(0.0), _float(0.0), _float(0.0), _float(0.0), _constant(False))  # never read

    def run(queries, k_rows, v_rows, k_codec, v_codec, scale: float, mask: Optional[mx.array], recent):
        length = k_rows.shape[2]
        chunks = max(1, min(most_chunks, -(-length // min_chunk)))  # launch_grid's, inline: the call path is hot
        o_part, ml = launch(
            partial_kernel,
            inputs=[
                queries,
                k_codec.sign,
                _float(scale / dim**0.5),
                k_rows,
                k_rows.view(mx.float32),  # the same buffer: the norm word read as a float
                v_rows,
                v_rows.view(mx.float32),
                _constant(False) if mask is None else mask.reshape(-1, length),
                _constant(False) if recent is None else recent.packed_mask,  # never read without
                k_codec.centroids,
                v_codec.centroids,
            ],
            template=partial_template,
            grid=(threads, chunks, batch * n_kv),
            threadgroup=(threads, 1, 1),
            output_shapes=[(batch * n_heads, chunks * splits, dim), (batch * n_heads, chunks * splits, 2)],
            output_dtypes=[mx.float32, mx.float32],
        )
        window = no_recent if recent is None else (queries, _float(scale), recent.keys, recent.values, recent.mask)
        (out,) = launch(combine_kernel, inputs=[o_part, ml, v_codec.sign, _float(1 / dim**0.5), *window], **combine)
        return out

    return run


@lru_cache(maxsize=None)
def _float(value: float) -> mx.array:
    """A one-element float32 input made once (decode_attention's _constant would hand 0.0 or 1.0 its
    cached boolean False or True: they hash alike)."""
    return mx.array([value], mx.float32)


TOLERANCE = 1e-4  # max abs error against the reference on the same codes, float32 outputs ~N(0, 1)
ROUNDED_TOLERANCE = 3e-2  # the same with bfloat16/float16 queries: both outputs rounded to that dtype


def _probe(on: str, dtype, dim: int, group: int, k_bits: int, v_bits: int, masked: bool, with_recent: bool,
           geometry: Geometry) -> Optional[str]:
    """Run one small case of this configuration at this geometry on the device (several chunks); None when
    it matches the reference."""
    from ..turboquant.codec import TurboQuantCodec

    k_codec, v_codec = TurboQuantCodec(dim, k_bits, 0), TurboQuantCodec(dim, v_bits, 1)
    batch, length, window = 2, 3 * geometry.min_chunk + 5, 16
    keys = mx.random.split(mx.random.key(0), 5)
    q = mx.random.normal((batch, group, 1, dim), key=keys[0]).astype(dtype)
    k = k_codec.encode(mx.random.normal((batch, 1, length, dim), key=keys[1]))
    v = v_codec.encode(mx.random.normal((batch, 1, length, dim), key=keys[2]))
    mask = (mx.arange(length)[None] >= mx.array([[0], [7]]))[:, None, None] if masked else None
    recent = None
    if with_recent:  # the newest keys in full precision, the second row missing its oldest 3
        recent = Recent(mx.random.normal((batch, 1, window, dim), key=keys[3]).astype(dtype),
                        mx.random.normal((batch, 1, window, dim), key=keys[4]).astype(dtype),
                        packed_mask=(mx.arange(length) < length - window)[None, None, None],
                        mask=(mx.arange(window)[None] >= mx.array([[0], [3]]))[:, None, None])
    scale = dim**-0.5
    got = attend(launcher(on), q, k, v, k_codec, v_codec, scale, mask, recent, geometry)
    with mx.stream(mx.cpu):  # MLX's CUDA float32 matmuls round through TF32, past TOLERANCE
        want = reference(q, k, v, k_codec, v_codec, scale, mask, recent)
    error = mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()
    tolerance = TOLERANCE if dtype == mx.float32 else ROUNDED_TOLERANCE
    return None if error <= tolerance else f"max error {error:.3g} > {tolerance}"
