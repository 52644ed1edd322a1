"""A decoder layer's residual adds fused with the RMSNorms around them, for the few rows of a decode step.

    add_norm:   h = x + RMSNorm(u)·w1,  y = RMSNorm(h)·w2    (after attention: h and the MLP's input)
    add_scaled: out = (x + RMSNorm(u)·w)·s, s optional      (after the MLP: the layer's output)

for rows [..., D] of one dtype, RMSNorm(u) = u / sqrt(mean(u²) + eps). A decode step on MLX's CUDA backend
is bound by the host's encoding of each launch (~14 µs, benchmarks/results/decode_time_split.md); the
unfused ops are three launches and two, these one each. A threadgroup a row: the sums of squares are
float32 reductions over the row, the arithmetic float32, rounded to the dtype exactly where MLX's ops
round (`mx.fast.rms_norm` rounds u/rms, then its product with the weight; then the add, then the scale),
so only a different summation order can move an element, by one unit of its last place.
"""

from functools import lru_cache, partial
from typing import Callable, Optional

import mlx.core as mx

from .kernel import Kernel, Launcher, backend, launcher, usable

# The row's residual sum h = x + RMSNorm(u)·w1, held as floats in registers (each rounded to T). ROW_SUM: the
# threadgroup's total of each thread's `value`, through a threadgroup array `scratch` of NT / 32 floats (a
# macro, since a function parameter in threadgroup memory is spelled differently on Metal and CUDA).
ADD = r"""
#define ROW_SUM(value, scratch) \
    value = simd_sum(value); \
    if (thread_index_in_simdgroup == 0) { \
        scratch[sg] = value; \
    } \
    threadgroup_barrier(mem_flags::mem_threadgroup); \
    value = 0.0f; \
    for (int s = 0; s < NT / 32; s++) { \
        value += scratch[s]; \
    }
    // Template: T, D (row length), NT (threads a row); eps[0] the norms' epsilon.
    constexpr int N = (D + NT - 1) / NT;  // elements a thread holds: t, t + NT, ...
    threadgroup float across_u[NT / 32];
    threadgroup float across_h[NT / 32];
    const uint t = thread_index_in_threadgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const size_t row = size_t(threadgroup_position_in_grid.x) * D;
    const float epsilon = eps[0];

    float h[N];
    float squares = 0.0f;
    for (int c = 0; c < N; c++) {
        const int i = t + c * NT;
        h[c] = i < D ? static_cast<float>(u[row + i]) : 0.0f;
        squares += h[c] * h[c];
    }
    ROW_SUM(squares, across_u);
    const float inv_rms = metal::rsqrt(squares / D + epsilon);
    for (int c = 0; c < N; c++) {
        const int i = metal::min(int(t + c * NT), D - 1);  // past the row: a copy of its last element, unused
        const float normed = static_cast<float>(static_cast<T>(h[c] * inv_rms));
        const float weighted = static_cast<float>(static_cast<T>(normed * static_cast<float>(w1[i])));
        h[c] = static_cast<float>(static_cast<T>(static_cast<float>(x[row + i]) + weighted));
    }
"""

# add_norm: writes h and y = RMSNorm(h)·w2.
NORM_TAIL = r"""
    squares = 0.0f;
    for (int c = 0; c < N; c++) {
        squares += t + c * NT < D ? h[c] * h[c] : 0.0f;
    }
    ROW_SUM(squares, across_h);
    const float inv_rms_h = metal::rsqrt(squares / D + epsilon);
    for (int c = 0; c < N; c++) {
        const int i = t + c * NT;
        if (i < D) {
            const float normed = static_cast<float>(static_cast<T>(h[c] * inv_rms_h));
            h_out[row + i] = static_cast<T>(h[c]);
            y[row + i] = static_cast<T>(normed * static_cast<float>(w2[i]));
        }
    }
"""

# add_scaled: writes h·scalar, or h (Template: SCALED).
SCALE_TAIL = r"""
    const float factor = SCALED ? static_cast<float>(scalar[0]) : 1.0f;
    for (int c = 0; c < N; c++) {
        const int i = t + c * NT;
        if (i < D) {
            out[row + i] = static_cast<T>(h[c] * factor);
        }
    }
"""

add_norm_kernel = Kernel(
    name="residual_add_norm",
    source=ADD + NORM_TAIL,
    inputs=["x", "u", "w1", "w2", "eps"],
    outputs=["h_out", "y"],
)
add_scaled_kernel = Kernel(
    name="residual_add_scaled",
    source=ADD + SCALE_TAIL,
    inputs=["x", "u", "w1", "scalar", "eps"],
    outputs=["out"],
)

THREADS = 512  # a row's threadgroup: 3 to 11 elements a thread for the presets' 1536 to 5376
MOST_PER_THREAD = 16  # registers a thread holds h in: rows up to 8192
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# The most rows (B·L) the fused kernels serve on each backend; more (prefill) keep MLX's ops. On CUDA a decode
# step is bound by the host's cost of each launch (benchmarks/results/decode_time_split.md), which these
# cut by three a layer; an earlier tok/s A/B was within that host's noise (on/off 0.89-1.03x,
# benchmarks/results/2026-11-23-h100-4bit-31b-residual-norm-ab.md). Metal's rms_norm is a single kernel
# too and nothing was timed there.
MOST_ROWS = {"cuda": 16, "metal": 0, "reference": 0}
TESTED_ROWS = 16  # the most rows the tests run the kernels on


@partial(mx.compile, shapeless=True)
def _scaled_sum(x: mx.array, update: mx.array, scalar: mx.array) -> mx.array:
    """(x + update)·scalar in one kernel."""
    return (x + update) * scalar


def reference_add_norm(x, u, w1, w2, eps: float):
    """The unfused MLX ops: (h, y)."""
    h = x + mx.fast.rms_norm(u, w1, eps)
    return h, mx.fast.rms_norm(h, w2, eps)


def reference_add_scaled(x, u, w, eps: float, scalar=None):
    """The unfused MLX ops."""
    normed = mx.fast.rms_norm(u, w, eps)
    return x + normed if scalar is None else _scaled_sum(x, normed, scalar)


def add_norm(x, u, w1, w2, eps: float):
    """(x + RMSNorm(u)·w1, RMSNorm of that ·w2) on this device's kernel, or the unfused ops."""
    run = plan(add_norm_kernel, x, u, w1, w2, eps)
    return run(x, u, w1, w2) if run else reference_add_norm(x, u, w1, w2, eps)


def add_scaled(x, u, w, eps: float, scalar=None):
    """(x + RMSNorm(u)·w)·scalar (no scale where None) on this device's kernel, or the unfused ops."""
    run = plan(add_scaled_kernel, x, u, w, scalar, eps)
    return run(x, u, w, scalar) if run else reference_add_scaled(x, u, w, eps, scalar)


# A decode step makes two or three of these calls a layer and on a GPU is bound by host time: everything
# but the lookup is decided once per signature (kernel, backend, launcher, shapes, dtypes, eps). A failed
# probe is not cached here: `usable` remembers it.
Plan = Callable[..., object]  # run(x, u, w1, w2 or scalar) -> (h, y) or out
_plans: dict = {}


def plan(kernel: Kernel, x, u, w, last, eps: float) -> Optional[Plan]:
    """The kernel call for inputs like these (`last`: add_norm's w2, add_scaled's scalar or None), or None
    where the unfused ops serve. The first plan of a configuration probes it on the device (`usable`):
    call this outside mx.compile."""
    on = backend()
    signature = (kernel.name, on, launcher, x.shape, x.dtype, u.shape, u.dtype, w.shape, w.dtype,
                 None if last is None else (last.shape, last.dtype), eps)
    run = _plans.get(signature, False)
    if run is False:
        run = None
        if _supported(kernel, on, x, u, w, last):
            config = (kernel.name, on, x.dtype, x.shape[-1])
            if not usable(config, lambda: _probe(*config)):
                return None
            run = _launches(launcher(on), kernel, x.shape, x.dtype, eps, last is not None)
        _plans[signature] = run
    return run


def _supported(kernel: Kernel, on: str, x, u, w, last) -> bool:
    dim = x.shape[-1]
    rows = x.size // dim if dim else 0
    last_shape = (dim,) if kernel is add_norm_kernel else (1,)
    return (
        0 < rows <= MOST_ROWS[on]
        and dim <= THREADS * MOST_PER_THREAD
        and x.dtype in DTYPES
        and u.shape == x.shape
        and u.dtype == w.dtype == x.dtype
        and w.shape == (dim,)
        and (last is None and kernel is add_scaled_kernel or last.shape == last_shape and last.dtype == x.dtype)
    )


def launches(launch: Launcher, kernel: Kernel, x, u, w, last, eps: float):
    """The kernel path through `launch` (a GPU backend, or the tests' CPU emulator): add_norm's (h, y) or
    add_scaled's output."""
    return _launches(launch, kernel, x.shape, x.dtype, eps, last is not None)(x, u, w, last)


def _launches(launch: Launcher, kernel: Kernel, shape: tuple, dtype, eps: float, scaled: bool) -> Plan:
    rows = 1
    for n in shape[:-1]:
        rows *= n
    template = [("T", dtype), ("D", shape[-1]), ("NT", THREADS)]
    call = dict(
        template=template if kernel is add_norm_kernel else template + [("SCALED", scaled)],
        grid=(THREADS * rows, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[shape] * len(kernel.outputs),
        output_dtypes=[dtype] * len(kernel.outputs),
    )
    epsilon = _constant(eps)
    if kernel is add_norm_kernel:
        return lambda x, u, w, w2: tuple(launch(kernel, inputs=[x, u, w, w2, epsilon], **call))
    # without a scalar the body reads none: any one-element array holds its place
    return lambda x, u, w, scalar: launch(kernel, inputs=[x, u, w, epsilon if scalar is None else scalar, epsilon],
                                          **call)[0]


@lru_cache(maxsize=None)
def _constant(value: float) -> mx.array:
    """eps as a one-element input, made once (a per-call array costs a copy to the device)."""
    return mx.array([value], mx.float32)


TOLERANCE = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 2e-2}  # relative to the largest output


def differences(got, want) -> Optional[str]:
    """None when every output is the reference's up to a different summation order."""
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    for g, w in zip(got, want):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"got {g.shape} {g.dtype}, want {w.shape} {w.dtype}"
        scale = max(mx.abs(w.astype(mx.float32)).max().item(), 1.0)
        error = mx.abs(g.astype(mx.float32) - w.astype(mx.float32)).max().item() / scale
        if not error <= TOLERANCE[w.dtype]:  # NaN fails too
            return f"max error {error:.3g} > {TOLERANCE[w.dtype]}"
    return None


def case(dtype, dim: int, rows: int, seed: int = 0):
    """Inputs like a layer's: a residual stream, an update of another scale, weights around 1, a scalar."""
    keys = mx.random.split(mx.random.key(seed), 5)
    x = (3 * mx.random.normal((rows, dim), key=keys[0])).astype(dtype)
    u = (0.2 * mx.random.normal((rows, dim), key=keys[1])).astype(dtype)
    w1 = (1 + 0.5 * mx.random.normal((dim,), key=keys[2])).astype(dtype)
    w2 = (1 + 0.5 * mx.random.normal((dim,), key=keys[3])).astype(dtype)
    scalar = mx.random.uniform(0.5, 2.0, (1,), key=keys[4]).astype(dtype)
    return x, u, w1, w2, scalar


EPS = 1e-6  # Gemma 4's rms_norm_eps


def _probe(name: str, on: str, dtype, dim: int) -> Optional[str]:
    """Run a small case of the kernel on the device; None when it matches the unfused ops."""
    x, u, w1, w2, scalar = case(dtype, dim, 3)
    go = launcher(on)
    if name == add_norm_kernel.name:
        return differences(launches(go, add_norm_kernel, x, u, w1, w2, EPS), reference_add_norm(x, u, w1, w2, EPS))
    return differences(launches(go, add_scaled_kernel, x, u, w1, scalar, EPS),
                       reference_add_scaled(x, u, w1, EPS, scalar))
