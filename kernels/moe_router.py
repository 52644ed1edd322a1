"""MoE routing (26B-A4B) in one kernel: which K experts each token goes to, and their weights.

    logits = (rms_norm(x) * scale * H^-0.5) @ proj.T        x [T, H], proj [E, H]
    indices = the K largest logits (K = 8 of E = 128)
    weights = softmax(logits[indices]) * per_expert_scale[indices]   (float32)

Softmax over the chosen logits equals transformers' softmax over all E renormalised over the top-K.
`proj` is float or affine 4/8-bit (moe_weights.py; the converter writes it 8-bit).

One threadgroup per token: its threads stage x * scale in threadgroup memory while summing x²;
simdgroups take the experts' rows in turn (lanes split the row) and write the logits, scaled by
rsqrt(Σx² + H·eps), which is rms_norm's factor times H^-0.5; simdgroup 0 then holds E / 32 logits a
lane and picks the top K by K rounds of simd_max (ties to the lower expert index). Indices come out
in descending logit order (the reference's order is unspecified).
"""

from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .kernel import Kernel, Launcher, backend, launcher, usable
from .moe_weights import Packed, kernel_supports, names, row_dot

SIMDGROUPS = 8

BODY = r"""
    // Template: N (= H), E, K, BITS, GS, VPC, SG (simdgroups).
    constexpr int NT = 32 * SG;
    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint tid = thread_index_in_threadgroup;
    const uint t = threadgroup_position_in_grid.x;
    threadgroup float xs[N];  // x * scale
    threadgroup float sums[SG];
    threadgroup float logits[E];

    float ss = 0.0f;
    for (int i = tid; i < N / 4; i += NT) {
        const f32x4 v = load4(x + size_t(t) * N + 4 * i);
        const f32x4 s = load4(scale + 4 * i);
        xs[4 * i] = v.x * s.x;
        xs[4 * i + 1] = v.y * s.y;
        xs[4 * i + 2] = v.z * s.z;
        xs[4 * i + 3] = v.w * s.w;
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = simd_sum(ss);
    if (lane == 0) {
        sums[sg] = ss;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = 0.0f;
    for (int i = 0; i < SG; i++) {
        total += sums[i];
    }
    const float norm = metal::rsqrt(total + N * eps[0]);  // rsqrt(mean x² + eps) * N^-0.5

    for (int e = sg; e < E; e += SG) {
        float acc = 0.0f;
        for (int c = lane; c < N / VPC; c += 32) {
            DOT
        }
        acc = simd_sum(acc);
        if (lane == 0) {
            logits[e] = acc * norm;
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    if (sg == 0) {
        float v[E / 32];  // lane l holds experts 32 * i + l
        for (int i = 0; i < E / 32; i++) {
            v[i] = logits[32 * i + lane];
        }
        float top[K];
        int chosen[K];
        for (int k = 0; k < K; k++) {
            float best = -3.0e38f;
            int at = 0;
            for (int i = 0; i < E / 32; i++) {
                if (v[i] > best) {
                    best = v[i];
                    at = 32 * i + lane;
                }
            }
            const float m = simd_max(best);
            const int e = -simd_max(best == m ? -at : -(1 << 30));
            if (e % 32 == int(lane)) {
                v[e / 32] = -3.0e38f;
            }
            top[k] = m;
            chosen[k] = e;
        }
        if (lane == 0) {
            const float m = top[0];
            float sum = 0.0f;
            for (int k = 0; k < K; k++) {
                top[k] = metal::exp(top[k] - m);
                sum += top[k];
            }
            for (int k = 0; k < K; k++) {
                indices[t * K + k] = uint(chosen[k]);
                weights[t * K + k] = top[k] / sum * static_cast<float>(per_expert_scale[chosen[k]]);
            }
        }
    }
"""


def _kernel(quantized: bool) -> Kernel:
    x_chunk = "f32x4{{xs[{0}], xs[({0}) + 1], xs[({0}) + 2], xs[({0}) + 3]}}"  # threadgroup memory: no load4
    dot = row_dot(quantized, "proj", ["e"], "c", x_chunk, ["acc"])
    source = BODY.replace("DOT", dot.replace("\n", "\n            "))
    return Kernel(
        name=f"moe_router_{'q' if quantized else 'f'}",
        source=source,
        inputs=["x", "scale", *names("proj", quantized), "per_expert_scale", "eps"],
        outputs=["indices", "weights"],
    )


KERNELS = {q: _kernel(q) for q in (False, True)}


def reference(x, proj: Packed, scale, per_expert_scale, top_k: int, eps: float) -> tuple:
    """The definition (the model's Router), in MLX ops: (indices uint32 [..., K], weights float32 [..., K])."""
    hidden = x.shape[-1]
    normed = mx.fast.rms_norm(x, None, eps) * (scale * hidden**-0.5)
    if proj.quantized:
        logits = mx.quantized_matmul(normed, proj.weight, proj.scales, proj.biases, True, proj.group_size, proj.bits)
    else:
        logits = normed @ proj.weight.T
    indices = mx.stop_gradient(mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k])
    weights = mx.softmax(mx.take_along_axis(logits, indices, axis=-1).astype(mx.float32), axis=-1)
    return indices, weights * per_expert_scale[indices].astype(mx.float32)


def supports(x, proj: Packed, scale, per_expert_scale, top_k: int) -> bool:
    hidden, experts = x.shape[-1], proj.weight.shape[0]
    return (
        kernel_supports(proj)
        and proj.n == hidden
        and hidden % (4 * 32) == 0
        and hidden * 4 <= 16384  # the staged x (float32) within half of Apple's 32 KiB threadgroup memory
        and experts % 32 == 0
        and 0 < top_k <= experts
        and x.dtype == scale.dtype
        and x.dtype in (mx.float32, mx.float16, mx.bfloat16)
    )


def route(x, proj: Packed, scale, per_expert_scale, top_k: int, eps: float) -> tuple:
    """(indices, weights) on this device's kernel, or the reference (see module doc)."""
    run = plan(x, proj, scale, per_expert_scale, top_k, eps)
    if run is None:
        return reference(x, proj, scale, per_expert_scale, top_k, eps)
    return run(x, proj, scale, per_expert_scale)


# Plans per signature, as decode_attention's: every MoE layer routes once a step, and on a GPU the step is
# bound by host time. The token count is not part of it (prefill chunks vary); the launch reads it.
_plans: dict = {}


def plan(x, proj: Packed, scale, per_expert_scale, top_k: int, eps: float):
    """The kernel call for inputs like these, run(x, proj, scale, per_expert_scale), or None where the
    reference serves; probes a new configuration."""
    on = backend()
    if on == "reference":
        return None
    signature = (on, launcher, x.shape[-1], x.dtype, proj.signature, scale.dtype, per_expert_scale.dtype, top_k, eps)
    run = _plans.get(signature, False)
    if run is False:
        run = None
        if supports(x, proj, scale, per_expert_scale, top_k):
            config = (on, x.dtype, x.shape[-1], proj.weight.shape[0], top_k, proj.bits, proj.group_size, eps)
            if not usable(("moe_router", *config), lambda: _probe(*config)):
                return None  # `usable` keeps this verdict, not the plans
            run = _launches(launcher(on), x.shape[-1], proj, top_k, eps)
        _plans[signature] = run
    return run


def run(launch: Launcher, x, proj: Packed, scale, per_expert_scale, top_k: int, eps: float) -> tuple:
    """The kernel path through `launch` (a GPU backend, or the tests' CPU emulator)."""
    return _launches(launch, x.shape[-1], proj, top_k, eps)(x, proj, scale, per_expert_scale)


def _launches(launch: Launcher, hidden: int, proj: Packed, top_k: int, eps: float):
    """The kernel call with its parameters worked out once, but for the token count. The body indexes x
    and the outputs flat, so nothing is reshaped."""
    kernel, eps_input = KERNELS[proj.quantized], _constant(float(eps))
    template = [("N", hidden), ("E", proj.weight.shape[0]), ("K", top_k), *proj.template(), ("SG", SIMDGROUPS)]
    threadgroup = (32 * SIMDGROUPS, 1, 1)
    output_dtypes = [mx.uint32, mx.float32]

    def run(x, proj: Packed, scale, per_expert_scale) -> tuple:
        shape = (*x.shape[:-1], top_k)
        indices, weights = launch(
            kernel,
            inputs=[x, scale, *proj.arrays, per_expert_scale, eps_input],
            template=template,
            grid=(32 * SIMDGROUPS * (x.size // hidden), 1, 1),
            threadgroup=threadgroup,
            output_shapes=[shape, shape],
            output_dtypes=output_dtypes,
        )
        return indices, weights

    return run


@lru_cache(maxsize=None)
def _constant(value: float) -> mx.array:
    """A one-element input made once, not on every call."""
    return mx.array([value], mx.float32)


def _probe(on: str, dtype, hidden: int, experts: int, top_k: int, bits: int, group_size: int, eps: float) -> Optional[str]:
    """One small case of this configuration on the device; None when it matches the reference."""
    keys = mx.random.split(mx.random.key(0), 3)
    x = mx.random.normal((3, hidden), key=keys[0]).astype(dtype)
    proj = random_packed((experts, hidden), bits, group_size, dtype, keys[1])
    scale = mx.ones((hidden,), dtype)
    per_expert = mx.random.uniform(0.5, 1.5, (experts,), key=keys[2]).astype(dtype)
    got = run(launcher(on), x, proj, scale, per_expert, top_k, eps)
    return mismatch(got, x, proj, scale, per_expert, top_k, eps)


def random_packed(shape, bits: int, group_size: int, dtype, key) -> Packed:
    """Random weights (std 0.02) in the given format: float when bits is 0."""
    w = (0.02 * mx.random.normal(shape, key=key)).astype(dtype)
    if not bits:
        return Packed(w)
    return Packed(*mx.quantize(w, group_size, bits), bits=bits, group_size=group_size)


def mismatch(got, x, proj: Packed, scale, per_expert_scale, top_k: int, eps: float) -> Optional[str]:
    """What differs between kernel routing `got` and the reference computed in float32 on the same
    values (the kernel's precision), on the CPU (a GPU may multiply float32 in TF32); None when the expert
    sets agree and weights are within 1e-4."""
    with mx.stream(mx.cpu):
        return _mismatch(got, x, proj, scale, per_expert_scale, top_k, eps)


def _mismatch(got, x, proj: Packed, scale, per_expert_scale, top_k: int, eps: float) -> Optional[str]:
    as32 = Packed(*[a if a.dtype == mx.uint32 else a.astype(mx.float32) for a in proj.arrays],
                  bits=proj.bits, group_size=proj.group_size) if proj.quantized else Packed(proj.weight.astype(mx.float32))
    want = reference(x.astype(mx.float32), as32, scale.astype(mx.float32), per_expert_scale, top_k, eps)
    got_order, want_order = mx.argsort(got[0], axis=-1), mx.argsort(want[0], axis=-1)
    if not mx.array_equal(mx.take_along_axis(got[0], got_order, -1), mx.take_along_axis(want[0], want_order, -1)).item():
        return "different experts chosen"
    error = mx.abs(mx.take_along_axis(got[1], got_order, -1) - mx.take_along_axis(want[1], want_order, -1)).max().item()
    return None if error <= 1e-4 else f"weights differ by {error:.3g}"
