"""TurboQuant encode-on-append: the only encoder of keys and values into packed cache rows.

    row(x) = [pack(codes(x)), bits of ‖x‖ / ‖c[codes(x)]‖ as float32],
    codes(x)_j = #{k : (R·x)_j > β_k·‖x‖}

for x [..., D] (D a power of two, 32 to 1024), R = H·diag(s)/√d the layer's randomized Hadamard
rotation, β the 2**bits - 1 Lloyd-Max boundaries and c the centroids (unit-vector scale). The stored
norm makes the dequantized vector ‖x‖·c[codes]/‖c[codes]‖ exactly as long as x (turboquant/codec.py
says why). The row layout is turboquant/packing.py's plus one word, the norm's bits.

Prefill chunks and decode steps both encode through here, a simdgroup per vector, so a token gets
the same codes whichever path wrote it. The whole row is one kernel call (a decode step is host-bound
on a GPU, so the norms are not separate MLX ops): the kernel rotates with the reference's butterflies
in the reference's order (lowest stride first: strides below D/32 inside a lane, the rest through
threadgroup memory) and compares products rather than dividing. Its norms are sums in its own order,
so a coordinate that lies on a boundary to float rounding may get the neighbouring code: the
reference matches it code for code everywhere else.
"""

import math
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from ..turboquant.packing import pack, unpack, words
from ..turboquant.rotation import fwht
from .kernel import Kernel, Launcher, backend, launcher, usable

ENCODE = r"""
    // Template: T (input dtype), D, BITS, VPG (vectors per threadgroup, one simdgroup each).
    constexpr int N = D / 32;  // coordinates a lane holds: lane l has l * N .. l * N + N - 1
    constexpr int LEVELS = 1 << BITS;
    constexpr int W = BITS == 4 ? D / 8 : (BITS == 2 ? D / 16 : D / 16 + D / 32);
    threadgroup float rotated[VPG * D];
    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const int rows = x_shape[0];
    const int wanted = threadgroup_position_in_grid.x * VPG + sg;
    const int row = metal::min(wanted, rows - 1);  // a spare simdgroup redoes the last row, unwritten
    const int base = sg * D;  // this simdgroup's vector in `rotated`

    float y[N];
    float squares = 0.0f;
    for (int c = 0; c < N; c++) {
        y[c] = static_cast<float>(x[size_t(row) * D + lane * N + c]) * sign[lane * N + c];
        squares += y[c] * y[c];
    }
    squares = simd_sum(squares);
    const float norm = squares > 0.0f ? squares * metal::rsqrt(squares) : 0.0f;
    for (int h = 1; h < N; h <<= 1) {  // butterflies inside the lane
        for (int c = 0; c < N; c++) {
            if ((c & h) == 0) {
                const float a = y[c];
                const float b = y[c + h];
                y[c] = a + b;
                y[c + h] = a - b;
            }
        }
    }
    for (int c = 0; c < N; c++) {
        rotated[base + lane * N + c] = y[c];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int h = N; h < D; h <<= 1) {  // butterflies across lanes
        for (int p = lane; p < D / 2; p += 32) {
            const int i = (p / h) * 2 * h + p % h;
            const float a = rotated[base + i];
            const float b = rotated[base + i + h];
            rotated[base + i] = a + b;
            rotated[base + i + h] = a - b;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    float bound[LEVELS - 1];
    for (int k = 0; k < LEVELS - 1; k++) {
        bound[k] = boundaries[k] * norm;
    }
    const float inv_sqrt_d = inv_sqrt_dim[0];
    float code_squares = 0.0f;  // ‖c[codes]‖², each code counted once (in the low plane at 3 bits)
    for (int w = lane; w < W; w += 32) {
        // which plane this word belongs to, its code width, and its first coordinate
        const bool high = BITS == 3 && w >= D / 16;
        const int width = BITS == 3 ? (high ? 1 : 2) : BITS;
        const int first = high ? (w - D / 16) * 32 : w * (32 / width);
        uint word = 0;
        for (int i = 0; i < 32 / width; i++) {
            const float z = rotated[base + first + i] * inv_sqrt_d;
            uint code = 0;
            for (int k = 0; k < LEVELS - 1; k++) {
                code += z > bound[k] ? 1u : 0u;
            }
            if (!high) {
                code_squares += centroids[code] * centroids[code];
            }
            const uint part = BITS == 3 ? (high ? code >> 2 : code & 3u) : code;
            word |= part << (i * width);
        }
        if (wanted < rows) {
            out[size_t(row) * (W + 1) + w] = word;
        }
    }
    code_squares = simd_sum(code_squares);
    // no centroid is 0 (an even number of levels, symmetric), so code_squares > 0
    if (wanted < rows && lane == 0) {
        out[size_t(row) * (W + 1) + W] = float_to_bits(norm * metal::rsqrt(code_squares));
    }
"""

encode_kernel = Kernel(
    name="tq_encode",
    source=ENCODE,
    inputs=["x", "sign", "boundaries", "centroids", "inv_sqrt_dim"],
    outputs=["out"],
)

VECTORS_PER_GROUP = 4
DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def norms_of(x: mx.array) -> mx.array:
    """‖x‖ over the last axis in float32."""
    x = x.astype(mx.float32)
    return mx.sqrt(mx.sum(x * x, axis=-1))


def _unit_rotated(x: mx.array, sign: mx.array) -> mx.array:
    """R·x, float32 (the butterflies of turboquant/rotation.py's fwht, then 1/√d)."""
    return fwht(x.astype(mx.float32) * sign) * mx.array(1 / math.sqrt(x.shape[-1]), mx.float32)


def _codes(z: mx.array, boundaries: mx.array, norms: mx.array) -> mx.array:
    return mx.sum(z[..., None] > boundaries * norms[..., None, None], axis=-1).astype(mx.uint32)


def _stored_norms(norms: mx.array, centroids: mx.array, codes: mx.array) -> mx.array:
    """‖x‖/‖c[codes]‖ (no centroid is 0, so the denominator never is)."""
    return norms / mx.sqrt(mx.sum(mx.square(centroids[codes]), axis=-1))


def reference(x: mx.array, sign: mx.array, centroids: mx.array, boundaries: mx.array, bits: int) -> mx.array:
    """The definition in MLX ops: [..., D] -> [..., words + 1] uint32 rows."""
    norms = norms_of(x)
    codes = _codes(_unit_rotated(x, sign), boundaries, norms)
    stored = _stored_norms(norms, centroids, codes)
    return mx.concatenate([pack(codes, bits), stored.view(mx.uint32)[..., None]], axis=-1)


TIE = 1e-5  # |z - β·‖x‖| <= TIE·‖x‖: a coordinate on a boundary to float rounding (a code step is > 1e-3·‖x‖)


def differences(rows: mx.array, x: mx.array, sign: mx.array, centroids: mx.array, boundaries: mx.array,
                bits: int) -> Optional[str]:
    """None when `rows` encode `x` as the reference does up to float rounding: the same codes except on
    a boundary (see TIE), and stored norms within 1e-5 of ‖x‖/‖c[codes]‖ for the codes in `rows`."""
    dim, count = x.shape[-1], words(x.shape[-1], bits)
    norms, z = norms_of(x), _unit_rotated(x, sign)
    got = unpack(rows[..., :count], bits, dim)
    on_boundary = mx.min(mx.abs(z[..., None] - boundaries * norms[..., None, None]), axis=-1) <= TIE * norms[..., None]
    wrong = mx.sum((got != _codes(z, boundaries, norms)) & ~on_boundary).item()
    want = _stored_norms(norms, centroids, got)
    norm_error = mx.max(mx.abs(rows[..., count].view(mx.float32) - want) / mx.maximum(want, 1e-30)).item()
    if wrong or norm_error > 1e-5:
        return f"{wrong} codes off a boundary differ; stored norms off by up to {norm_error:.2g} (relative)"
    return None


def supports(x: mx.array) -> bool:
    dim = x.shape[-1]
    return x.dtype in DTYPES and 32 <= dim <= 1024 and dim & (dim - 1) == 0


def encode(x: mx.array, sign: mx.array, centroids: mx.array, boundaries: mx.array, bits: int) -> mx.array:
    """Packed rows of `x` on this device's kernel, or the reference (see module doc)."""
    run = plan(x, bits)
    if run is None:
        return reference(x, sign, centroids, boundaries, bits)
    return run(x, sign, centroids, boundaries)


# Plans per signature, as decode_attention's: a decode step encodes twice per KV-owning layer, and on a GPU
# the step is bound by host time. The row count is not part of it (prefill chunks vary); the launch reads it.
_plans: dict = {}


def plan(x: mx.array, bits: int):
    """The kernel call for vectors like `x`, run(x, sign, centroids, boundaries), or None where the
    reference serves; probes a new configuration."""
    on = backend()
    if on == "reference":
        return None
    signature = (on, launcher, x.shape[-1], x.dtype, bits)
    run = _plans.get(signature, False)
    if run is False:
        run = None
        if supports(x):
            config = (on, x.dtype, x.shape[-1], bits)
            if not usable(("tq_encode", *config), lambda: _probe(*config)):
                return None  # `usable` keeps this verdict, not the plans
            run = _launches(launcher(on), x.shape[-1], x.dtype, bits)
        _plans[signature] = run
    return run


def run(launch: Launcher, x: mx.array, sign: mx.array, centroids: mx.array, boundaries: mx.array,
        bits: int) -> mx.array:
    """The kernel path through `launch` (a GPU backend, or the tests' CPU emulator): one call."""
    return _launches(launch, x.shape[-1], x.dtype, bits)(x, sign, centroids, boundaries)


def _launches(launch: Launcher, dim: int, dtype, bits: int):
    """The kernel call with its parameters worked out once, but for the row count (the body reads it
    from x's shape, so x goes in as [rows, D]; the output is written flat, shaped as x)."""
    template = [("T", dtype), ("D", dim), ("BITS", bits), ("VPG", VECTORS_PER_GROUP)]
    threadgroup = (32 * VECTORS_PER_GROUP, 1, 1)
    inv_sqrt, width = _inv_sqrt(dim), words(dim, bits) + 1

    def run(x: mx.array, sign: mx.array, centroids: mx.array, boundaries: mx.array) -> mx.array:
        flat = x.reshape(-1, dim)
        groups = -(-flat.shape[0] // VECTORS_PER_GROUP)
        (out,) = launch(
            encode_kernel,
            inputs=[flat, sign, boundaries, centroids, inv_sqrt],
            template=template,
            grid=(32 * VECTORS_PER_GROUP * groups, 1, 1),
            threadgroup=threadgroup,
            output_shapes=[(*x.shape[:-1], width)],
            output_dtypes=[mx.uint32],
        )
        return out

    return run


@lru_cache(maxsize=None)
def _inv_sqrt(dim: int) -> mx.array:
    return mx.array([1 / math.sqrt(dim)], mx.float32)


def _probe(on: str, dtype, dim: int, bits: int) -> Optional[str]:
    """Encode a few vectors on the device; None when the rows are the reference's (see `differences`)."""
    from ..turboquant.codec import TurboQuantCodec

    codec = TurboQuantCodec(dim, bits, seed=0)
    x = mx.random.normal((2, 3, 7, dim), key=mx.random.key(0)).astype(dtype)
    rows = run(launcher(on), x, codec.sign, codec.centroids, codec.boundaries, bits)
    return differences(rows, x, codec.sign, codec.centroids, codec.boundaries, bits)
