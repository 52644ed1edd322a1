"""A decode step's attention inputs from its q/k/v projections, in one launch:

    queries[b, h, l] = RoPE(RMSNorm(q[b, l, h])·wq, offset + l)
    keys[b, h, l]    = RoPE(RMSNorm(k[b, l, h])·wk, offset + l)
    values[b, h, l]  = RMSNorm(v[b, l, h])                       (no weight)

q [B, L, HQ·D], k and v [B, L, HKV·D] (k_eq_v layers pass k's projection as v); outputs [B, H, L, D], the
layout attention and the caches take. RMSNorm(x) = x / sqrt(mean(x²) + eps) per head; RoPE is the
non-traditional rotation of the pairs (i, i + D/2), with inverse frequencies 2^(-(i / (D/2))·log2(base))
or, for proportional RoPE, given (1 / period, 0 for the unrotated pairs). Unfused these are five launches
a layer (two norms and two RoPEs through mx.fast, the values' norm), and a decode step on MLX's CUDA
backend is bound by the host's cost of each launch (benchmarks/results/decode_time_split.md).

Rounded to the dtype exactly where MLX's ops round (`mx.fast.rms_norm` rounds x/rms, then its product
with the weight; `mx.fast.rope` computes in float from those and rounds its outputs), with MLX's CUDA
expressions for the angle (theta = float(position)·inv_freq, cos and sin of it in float): only the
norms' summation order differs. A threadgroup per (row, head), a thread per rotated pair.
"""

from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .kernel import Kernel, Launcher, backend, launcher, usable
from .residual_norm import differences  # each output within the dtype's tolerance of the reference's

SOURCE = r"""
    // Template: T, D (head dim), HQ, HKV, FREQS (inverse frequencies given, else freq[0] = log2(base)).
    constexpr int NT = D / 2;  // a thread per pair (i, i + D/2)
    threadgroup float across[NT / 32];
    const uint t = thread_index_in_threadgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const int L = q_shape[1];
    const int heads = HQ + 2 * HKV;
    const int row = threadgroup_position_in_grid.x / heads;  // b * L + l
    const int head = threadgroup_position_in_grid.x % heads;
    const int b = row / L;
    const int l = row % L;
    const bool is_q = head < HQ;
    const bool is_k = !is_q && head < HQ + HKV;
    const int H = is_q ? HQ : HKV;
    const int h = is_q ? head : (is_k ? head - HQ : head - HQ - HKV);
    const size_t at = (size_t(row) * H + h) * D + t;
    const float x1 = static_cast<float>(is_q ? q[at] : (is_k ? k[at] : v[at]));
    const float x2 = static_cast<float>(is_q ? q[at + NT] : (is_k ? k[at + NT] : v[at + NT]));

    float squares = simd_sum(x1 * x1 + x2 * x2);
    if (thread_index_in_simdgroup == 0) {
        across[sg] = squares;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    squares = 0.0f;
    for (int s = 0; s < NT / 32; s++) {
        squares += across[s];
    }
    const float inv_rms = metal::rsqrt(squares / D + eps[0]);
    float n1 = static_cast<float>(static_cast<T>(x1 * inv_rms));
    float n2 = static_cast<float>(static_cast<T>(x2 * inv_rms));
    const size_t out_at = ((size_t(b) * H + h) * L + l) * D + t;
    if (!is_q && !is_k) {
        v_out[out_at] = static_cast<T>(n1);
        v_out[out_at + NT] = static_cast<T>(n2);
        return;
    }
    n1 = static_cast<float>(static_cast<T>(n1 * static_cast<float>(is_q ? wq[t] : wk[t])));
    n2 = static_cast<float>(static_cast<T>(n2 * static_cast<float>(is_q ? wq[t + NT] : wk[t + NT])));
    const float inv_freq = FREQS ? freq[t] : metal::exp2(-(static_cast<float>(t) / static_cast<float>(NT)) * freq[0]);
    const float theta = static_cast<float>(offset[0] + l) * inv_freq;
    const float c = metal::cos(theta);
    const float s = metal::sin(theta);
    const T r1 = static_cast<T>(n1 * c - n2 * s);
    const T r2 = static_cast<T>(n1 * s + n2 * c);
    if (is_q) {
        q_out[out_at] = r1;
        q_out[out_at + NT] = r2;
    } else {
        k_out[out_at] = r1;
        k_out[out_at + NT] = r2;
    }
"""

head_norm_rope_kernel = Kernel(
    name="head_norm_rope",
    source=SOURCE,
    inputs=["q", "k", "v", "wq", "wk", "freq", "offset", "eps"],
    outputs=["q_out", "k_out", "v_out"],
)

DTYPES = (mx.float32, mx.float16, mx.bfloat16)
HEAD_DIMS = (64, 128, 256, 512)  # D / 2 threads: whole simdgroups, at most a threadgroup's 256 (Metal: 1024)
# The most rows (B·L) the kernel serves on each backend; more (prefill) keep MLX's ops. Metal's fast ops are
# single kernels too and nothing was timed there.
MOST_ROWS = {"cuda": 16, "metal": 0, "reference": 0}
TESTED_ROWS = 16  # the most rows the tests run the kernel on


def rope_frequencies(base: Optional[float], periods: Optional[mx.array]) -> tuple:
    """(FREQS, the kernel's `freq` input) for RoPE of `base`, or of `periods` (proportional RoPE, inf for the
    unrotated pairs): as MLX's CUDA rope computes them, log2(base) as a float, or 1 / period in double
    rounded to float."""
    if periods is None:
        return False, mx.array(np.log2(np.array([base], np.float32)))
    return True, mx.array((1.0 / np.array(periods, np.float64)).astype(np.float32))


def reference(q, k, v, wq, wk, eps: float, offset: int, base: Optional[float], periods: Optional[mx.array], dim: int):
    """The unfused MLX ops: (queries, keys, values), each [B, H, L, D]. RoPE runs in float32 and rounds once,
    as MLX's GPU kernels do for every dtype (its CPU fallback computes in the input's dtype)."""
    batch, length = q.shape[:2]
    heads = lambda x: x.reshape(batch, length, -1, dim).transpose(0, 2, 1, 3)
    rope = lambda x: mx.fast.rope(x.astype(mx.float32), dim, traditional=False, base=None if periods is not None else base,
                                  scale=1.0, offset=offset, freqs=periods).astype(x.dtype)
    return (rope(mx.fast.rms_norm(heads(q), wq, eps)), rope(mx.fast.rms_norm(heads(k), wk, eps)),
            mx.fast.rms_norm(heads(v), None, eps))


# A decode step calls this once a KV-owning layer and on a GPU is bound by host time: everything but the
# lookup and the offset's array is decided once per signature. A failed probe is not cached here: `usable`
# remembers it.
Plan = Callable[..., tuple]  # run(q, k, v, wq, wk, freq, offset) -> (queries, keys, values)
_plans: dict = {}


def plan(q, k, v, wq, wk, frequencies: tuple, eps: float, dim: int) -> Optional[Plan]:
    """The kernel call for inputs like these (`frequencies` as `rope_frequencies` gives), or None where the
    unfused ops serve. The first plan of a configuration probes it on the device: call outside mx.compile."""
    on = backend()
    signature = (on, launcher, q.shape, k.shape, v.shape, q.dtype, wq.dtype, wk.dtype, frequencies[0], eps, dim)
    run = _plans.get(signature, False)
    if run is False:
        run = None
        if _supported(on, q, k, v, wq, wk, dim):
            config = (on, q.dtype, dim, q.shape[-1] // dim, k.shape[-1] // dim, frequencies[0])
            if not usable(("head_norm_rope", *config), lambda: _probe(*config)):
                return None
            run = _launches(launcher(on), q.shape, k.shape[-1] // dim, q.dtype, dim, frequencies[0], eps)
        _plans[signature] = run
    return run


def _supported(on: str, q, k, v, wq, wk, dim: int) -> bool:
    rows = q.size // q.shape[-1] if q.ndim == 3 else 0
    return (
        0 < rows <= MOST_ROWS[on]
        and dim in HEAD_DIMS
        and q.dtype in DTYPES
        and k.dtype == v.dtype == wq.dtype == wk.dtype == q.dtype
        and k.shape == v.shape
        and k.ndim == 3
        and q.shape[:2] == k.shape[:2]
        and q.shape[-1] % dim == 0
        and k.shape[-1] % dim == 0
        and k.shape[-1] > 0
        and wq.shape == wk.shape == (dim,)
    )


def launches(launch: Launcher, q, k, v, wq, wk, frequencies: tuple, offset: int, eps: float, dim: int) -> tuple:
    """The kernel path through `launch` (a GPU backend, or the tests' CPU emulator)."""
    run = _launches(launch, q.shape, k.shape[-1] // dim, q.dtype, dim, frequencies[0], eps)
    return run(q, k, v, wq, wk, frequencies[1], offset)


def _launches(launch: Launcher, q_shape: tuple, kv_heads: int, dtype, dim: int, freqs: bool, eps: float) -> Plan:
    batch, length = q_shape[:2]
    q_heads = q_shape[-1] // dim
    call = dict(
        template=[("T", dtype), ("D", dim), ("HQ", q_heads), ("HKV", kv_heads), ("FREQS", freqs)],
        grid=(dim // 2 * batch * length * (q_heads + 2 * kv_heads), 1, 1),
        threadgroup=(dim // 2, 1, 1),
        output_shapes=[(batch, q_heads, length, dim), (batch, kv_heads, length, dim), (batch, kv_heads, length, dim)],
        output_dtypes=[dtype] * 3,
    )
    epsilon = _constant(eps)

    def run(q, k, v, wq, wk, freq, offset: int):
        position = mx.array([offset], mx.int32)
        return tuple(launch(head_norm_rope_kernel, inputs=[q, k, v, wq, wk, freq, position, epsilon], **call))

    return run


@lru_cache(maxsize=None)
def _constant(value: float) -> mx.array:
    """eps as a one-element input, made once (a per-call array costs a copy to the device)."""
    return mx.array([value], mx.float32)


def case(dtype, dim: int, q_heads: int, kv_heads: int, rows: int, seed: int = 0) -> tuple:
    """Projections like a layer's (q, k, v [1, rows, H·D]) and norm weights around 1."""
    keys = mx.random.split(mx.random.key(seed), 5)
    q = (2 * mx.random.normal((1, rows, q_heads * dim), key=keys[0])).astype(dtype)
    k = (0.5 * mx.random.normal((1, rows, kv_heads * dim), key=keys[1])).astype(dtype)
    v = mx.random.normal((1, rows, kv_heads * dim), key=keys[2]).astype(dtype)
    wq = (1 + 0.3 * mx.random.normal((dim,), key=keys[3])).astype(dtype)
    wk = (1 + 0.3 * mx.random.normal((dim,), key=keys[4])).astype(dtype)
    return q, k, v, wq, wk


EPS = 1e-6  # Gemma 4's rms_norm_eps
PROBE_OFFSET = 4099  # a position whose angles wrap many times


def probe_frequencies(dim: int, freqs: bool) -> tuple:
    """Gemma 4's RoPE of each kind: base 10000 (sliding layers), or a quarter of the pairs rotating at base 1e6
    (proportional: global layers), as (base, periods)."""
    if not freqs:
        return 10000.0, None
    pairs = dim // 2
    rotated = pairs // 4
    periods = mx.concatenate([1e6 ** (mx.arange(0, 2 * rotated, 2, dtype=mx.float32) / dim),
                              mx.full((pairs - rotated,), mx.inf)])
    return None, periods


def _probe(on: str, dtype, dim: int, q_heads: int, kv_heads: int, freqs: bool) -> Optional[str]:
    """Run a small case of this configuration on the device; None when it matches the unfused ops."""
    q, k, v, wq, wk = case(dtype, dim, q_heads, kv_heads, 2)
    base, periods = probe_frequencies(dim, freqs)
    got = launches(launcher(on), q, k, v, wq, wk, rope_frequencies(base, periods), PROBE_OFFSET, EPS, dim)
    return differences(got, reference(q, k, v, wq, wk, EPS, PROBE_OFFSET, base, periods, dim))
