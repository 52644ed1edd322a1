"""The MoE experts (26B-A4B): each token's K experts' GeGLU, weighted and summed.

    out[t] = Σ_k weights[t, k] · down[e] @ (gelu_tanh(gate[e] @ x[t]) * (up[e] @ x[t])),  e = indices[t, k]

gate_up [E, 2I, H] holds gate rows then up rows (HF's fused `gate_up_proj`), down [E, H, I]; float or
affine 4/8-bit (moe_weights.py). x [T, H]; indices, weights [T, K] from the router (moe_router.py).

Decode (up to DECODE_TOKENS tokens) runs in two passes that stream the chosen experts' weights once,
each lane reading 16 bytes of every row it works on per step (moe_weights.row_dot), all rows' loads issued
before their arithmetic:
1. `moe_gate_up`: a simdgroup per (token, slot k, J consecutive j < I) reads gate rows j and up rows j
   of expert e together (lanes split H into chunks), and writes gelu(gate) * up, float32, to act [T*K, I].
2. `moe_down`: a threadgroup per (token, R output rows) walks all K experts' down rows at once, its SG
   simdgroups splitting K * I between them, weighting each expert's part by its routing weight (the
   combine is free); the simdgroups' sums meet in threadgroup memory.
Sizing, for 26B-A4B on an H100 (132 SMs, ~32-64 KB in flight per SM saturate HBM): a lane has 2J = 8
gate/up or R = 8 down rows' 16-byte chunks in flight, 4 KB a simdgroup; one token's gate/up pass is 8 * 704
/ J = 1408 simdgroups, ~43 KB an SM, and its down pass 2816 / R * SG = 1408, the same. Splitting K * I
between simdgroups is what lets the down pass, whose output has only 2816 rows, have as many loads in
flight as the gate/up pass. nvcc 13 for sm_90 gives the 4-bit passes 72 and 96 registers, no spills: either
pass's 1408 simdgroups (~11 an SM) are all resident at once.
More tokens (prefill) go to moe_prefill.py, which sorts the (token, expert) pairs by expert so that
each expert's weights are read once per run of tokens (and, past a size, dequantized for dense GEMMs).
"""

import math
from typing import Optional

import mlx.core as mx

from .kernel import Kernel, Launcher, backend, launcher, usable
from .moe_prefill import combine, gathered, gathered_matmul, geglu, prefill
from .moe_weights import Packed, kernel_supports, names, row_dot

DECODE_TOKENS = 8  # the kernels' range; beyond it the sorted gathered matmuls win (weights reread per token)
SORT_THRESHOLD = 64  # (token, expert) pairs from which sorting by expert pays
SIMDGROUPS = 4
GATE_UP_JS = 4  # j's a gate/up simdgroup computes: 8 rows' chunks in flight per lane (module doc)
DOWN_ROWS = 8  # output rows of a down threadgroup, whose simdgroups split K * I: 8 chunks in flight per lane

GATE_UP = r"""
    // Template: N (= H), I, K, BITS, GS, VPC, SG, J (j's a simdgroup).
    const uint lane = thread_index_in_simdgroup;
    const uint pair = threadgroup_position_in_grid.z;  // token * K + slot
    const int j0 = (threadgroup_position_in_grid.y * SG + simdgroup_index_in_threadgroup) * J;
    if (j0 < I) {  // uniform across the simdgroup; I is a multiple of J
        const size_t e = indices[pair];
        const size_t xrow = size_t(pair / K) * N;
        float acc[2 * J];  // gate rows, then up rows
        for (int i = 0; i < 2 * J; i++) {
            acc[i] = 0.0f;
        }
        for (int c = lane; c < N / VPC; c += 32) {
            DOT
        }
        for (int i = 0; i < J; i++) {
            const float gate = simd_sum(acc[i]);
            const float up = simd_sum(acc[J + i]);
            if (lane == 0) {
                // gelu, tanh approximation; tanh(u) = 1 - 2 / (exp(2u) + 1) is exact at both infinities
                const float u = 0.7978845608028654f * (gate + 0.044715f * gate * gate * gate);
                const float tanh_u = 1.0f - 2.0f / (metal::exp(2.0f * u) + 1.0f);
                act[size_t(pair) * I + j0 + i] = 0.5f * gate * (1.0f + tanh_u) * up;
            }
        }
    }
"""

DOWN = r"""
    // Template: N (= I), H, K, BITS, GS, VPC, SG, R (rows a threadgroup), OT (output type).
    constexpr int CPR = N / VPC;  // chunks per expert row
    threadgroup float partial[SG * R];
    const uint lane = thread_index_in_simdgroup;
    const uint tid = thread_index_in_threadgroup;
    const uint t = threadgroup_position_in_grid.z;
    const int h0 = threadgroup_position_in_grid.y * R;
    float acc[R];
    for (int i = 0; i < R; i++) {
        acc[i] = 0.0f;
    }
    for (int c = tid; c < K * CPR; c += 32 * SG) {
        const int k = c / CPR;
        const int chunk = c - k * CPR;
        const uint pair = t * K + k;
        const size_t e = indices[pair];
        const float weight = weights[pair];
        const size_t xrow = size_t(pair) * N;
        DOT
    }
    for (int i = 0; i < R; i++) {
        const float total = simd_sum(acc[i]);
        if (lane == 0) {
            partial[simdgroup_index_in_threadgroup * R + i] = total;
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid < R && h0 + int(tid) < H) {
        float total = 0.0f;
        for (int g = 0; g < SG; g++) {
            total += partial[g * R + tid];
        }
        out[size_t(t) * H + h0 + tid] = static_cast<OT>(total);
    }
"""


def _indent(code: str, spaces: int) -> str:
    return code.replace("\n", "\n" + " " * spaces)


def _gate_up_kernel(quantized: bool) -> Kernel:
    js = [f"j0 + {i}" for i in range(GATE_UP_JS)]  # I is a multiple of J (supports)
    rows = [f"e * 2 * I + {j}" for j in js] + [f"e * 2 * I + I + {j}" for j in js]
    acc = [f"acc[{i}]" for i in range(2 * GATE_UP_JS)]
    dot = row_dot(quantized, "w", rows, "c", "load4(x + xrow + {})", acc)
    return Kernel(
        name=f"moe_gate_up_{'q' if quantized else 'f'}",
        source=GATE_UP.replace("DOT", _indent(dot, 12)),
        inputs=["x", "indices", *names("w", quantized)],
        outputs=["act"],
    )


def _down_kernel(quantized: bool) -> Kernel:
    rows = [f"e * H + metal::min(h0 + {i}, H - 1)" for i in range(DOWN_ROWS)]  # past H: row H - 1, never written
    acc = [f"acc[{i}]" for i in range(DOWN_ROWS)]
    dot = row_dot(quantized, "w", rows, "chunk", "load4(act + xrow + {})", acc, factor="weight")
    return Kernel(
        name=f"moe_down_{'q' if quantized else 'f'}",
        source=DOWN.replace("DOT", _indent(dot, 8)),
        inputs=["act", "indices", "weights", *names("w", quantized)],
        outputs=["out"],
    )


GATE_UP_KERNELS = {q: _gate_up_kernel(q) for q in (False, True)}
DOWN_KERNELS = {q: _down_kernel(q) for q in (False, True)}


def reference(x, indices, weights, gate_up: Packed, down: Packed) -> mx.array:
    """The definition in MLX's gathered matmuls: x [..., H], indices/weights [..., K] -> [..., H]; from
    SORT_THRESHOLD pairs on, sorted by expert (moe_prefill.gathered)."""
    lead, hidden, k = x.shape[:-1], x.shape[-1], indices.shape[-1]
    x, indices, weights = x.reshape(-1, hidden), indices.reshape(-1, k), weights.reshape(-1, k)
    if indices.size >= SORT_THRESHOLD:
        return gathered(x, indices, weights, gate_up, down).reshape(*lead, hidden)
    act = geglu(gathered_matmul(gate_up, x[:, None, None], indices, False))  # [T, K, 1, I]
    out = gathered_matmul(down, act, indices, False)
    return combine(out.reshape(-1, hidden), weights).reshape(*lead, hidden)


def supports(x, indices, weights, gate_up: Packed, down: Packed) -> bool:
    """Shapes and formats the decode kernels take; anything else goes to the reference."""
    hidden, inner = x.shape[-1], down.n
    tokens = x.size // hidden
    return (
        0 < tokens <= DECODE_TOKENS
        and kernel_supports(gate_up)
        and kernel_supports(down)
        and gate_up.n == hidden
        and gate_up.weight.shape[-2] == 2 * inner
        and inner % GATE_UP_JS == 0  # always so: a row length is a multiple of 4 (float) or 32 (quantized)
        and down.weight.shape[-2] == hidden
        and x.dtype in (mx.float32, mx.float16, mx.bfloat16)
        and indices.dtype in (mx.uint32, mx.int32)
        and weights.dtype == mx.float32
    )


def experts(x, indices, weights, gate_up: Packed, down: Packed) -> mx.array:
    """[..., H] on this device's decode kernels when they apply, else the reference (see module doc)."""
    run = plan(x, indices, weights, gate_up, down)
    if run is not None:
        return run(x, indices, weights, gate_up, down)
    if indices.size >= SORT_THRESHOLD:
        return prefill(backend(), x, indices, weights, gate_up, down)
    return reference(x, indices, weights, gate_up, down)


# Plans per signature, as decode_attention's: a decode step calls this once per MoE layer, and on a GPU
# the step is bound by host time, so the checks, probe lookup and launch parameters are worked out once.
_plans: dict = {}


def plan(x, indices, weights, gate_up: Packed, down: Packed):
    """The decode kernels' call for inputs like these on this backend, run(x, indices, weights, gate_up,
    down), or None where the reference or a prefill path serves; probes a new configuration."""
    on = backend()
    if on == "reference" or x.size > DECODE_TOKENS * x.shape[-1]:  # prefill shapes are not cached: they vary
        return None
    signature = (on, launcher, x.shape, x.dtype, indices.shape, indices.dtype, weights.dtype, gate_up.signature,
                 down.signature)
    run = _plans.get(signature, False)
    if run is False:
        run = None
        if supports(x, indices, weights, gate_up, down):
            config = (on, x.dtype, x.shape[-1], down.n, indices.shape[-1], gate_up.bits, down.bits,
                      gate_up.group_size, down.group_size, gate_up.weight.dtype, down.weight.dtype)
            if not usable(("moe_experts", *config), lambda: _probe(on, x, indices, gate_up, down)):
                return None  # `usable` keeps this verdict, not the plans
            run = _launches(launcher(on), x.shape, x.dtype, indices.shape[-1], gate_up, down)
        _plans[signature] = run
    return run


def run(launch: Launcher, x, indices, weights, gate_up: Packed, down: Packed) -> mx.array:
    """The decode kernels through `launch` (a GPU backend, or the tests' CPU emulator)."""
    return _launches(launch, x.shape, x.dtype, indices.shape[-1], gate_up, down)(x, indices, weights, gate_up, down)


def _launches(launch: Launcher, shape: tuple, dtype, k: int, gate_up: Packed, down: Packed):
    """Both passes for inputs of this shape, their parameters worked out once. The bodies index x,
    indices, weights and the output flat, so none of them is reshaped."""
    hidden, inner = shape[-1], down.n
    tokens = math.prod(shape) // hidden
    gate_up_kernel, down_kernel = GATE_UP_KERNELS[gate_up.quantized], DOWN_KERNELS[down.quantized]
    gate_up_call = dict(
        template=[("N", hidden), ("I", inner), ("K", k), *gate_up.template(), ("SG", SIMDGROUPS), ("J", GATE_UP_JS)],
        grid=(32 * SIMDGROUPS, -(-inner // (SIMDGROUPS * GATE_UP_JS)), tokens * k),
        threadgroup=(32 * SIMDGROUPS, 1, 1),
        output_shapes=[(tokens * k, inner)],
        output_dtypes=[mx.float32],
    )
    down_call = dict(
        template=[("N", inner), ("H", hidden), ("K", k), *down.template(), ("SG", SIMDGROUPS), ("R", DOWN_ROWS),
                  ("OT", dtype)],
        grid=(32 * SIMDGROUPS, -(-hidden // DOWN_ROWS), tokens),
        threadgroup=(32 * SIMDGROUPS, 1, 1),
        output_shapes=[shape],
        output_dtypes=[dtype],
    )

    def run(x, indices, weights, gate_up: Packed, down: Packed) -> mx.array:
        (act,) = launch(gate_up_kernel, inputs=[x, indices, *gate_up.arrays], **gate_up_call)
        (out,) = launch(down_kernel, inputs=[act, indices, weights, *down.arrays], **down_call)
        return out

    return run


def float32_reference(x, indices, weights, gate_up: Packed, down: Packed) -> mx.array:
    """The reference on the same values in float32 throughout (the kernels' precision), on the CPU: a GPU
    may multiply float32 in TF32."""
    with mx.stream(mx.cpu):
        as32 = [Packed(w.dense().astype(mx.float32)) for w in (gate_up, down)]
        return reference(x.astype(mx.float32), indices, weights, *as32)


TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 2e-2}  # relative to the output's max


def mismatch(got, want) -> Optional[str]:
    """None when `got` is within the output dtype's tolerance of `want` (relative to want's scale)."""
    error = mx.abs(got.astype(mx.float32) - want).max().item() / max(mx.abs(want).max().item(), 1e-30)
    return None if error <= TOLERANCE[got.dtype] else f"relative error {error:.3g} > {TOLERANCE[got.dtype]}"


def _probe(on: str, x, indices, gate_up: Packed, down: Packed) -> Optional[str]:
    """The configuration of this call on a small case (two tokens, a few experts); None when it matches."""
    hidden, k = x.shape[-1], indices.shape[-1]
    keys = mx.random.split(mx.random.key(0), 4)
    small = [Packed(*[a[: k + 1] for a in w.arrays], bits=w.bits, group_size=w.group_size) for w in (gate_up, down)]
    xs = mx.random.normal((2, hidden), key=keys[0]).astype(x.dtype)
    chosen = mx.stack([mx.arange(k), mx.arange(1, k + 1)]).astype(indices.dtype)
    routing = mx.softmax(mx.random.normal((2, k), key=keys[1]), axis=-1)
    got = run(launcher(on), xs, chosen, routing, *small)
    return mismatch(got, float32_reference(xs, chosen, routing, *small))
