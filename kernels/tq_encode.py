"""TurboQuant encode-on-append: the only encoder of keys and values into packed cache rows.

    row(x) = [pack(codes(x)), bits of ‖x‖ as float32],  codes(x)_j = #{k : (R·x)_j > β_k·‖x‖}

for x [..., D] (D a power of two, 32 to 512), R = H·diag(s)/√d the layer's randomized Hadamard
rotation and β the 2**bits - 1 Lloyd-Max boundaries (unit-vector scale), so that dequantized
‖x‖·c[code] approximates R·x. The row layout is turboquant/packing.py's plus one word, the norm's bits.

Prefill chunks and decode steps both encode through here, a simdgroup per vector with the same
arithmetic, so a token gets the same codes whichever path wrote it. The norm is computed by MLX
(one op, the same on every path); the kernel rotates with the reference's butterflies in the
reference's order (lowest stride first: strides below D/32 inside a lane, the rest through
threadgroup memory) and compares products rather than dividing, so the kernel matches the reference
bit for bit.
"""

import math
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from ..turboquant.packing import pack, words
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
    for (int c = 0; c < N; c++) {
        y[c] = static_cast<float>(x[size_t(row) * D + lane * N + c]) * sign[lane * N + c];
    }
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

    const float norm = norms[row];
    float bound[LEVELS - 1];
    for (int k = 0; k < LEVELS - 1; k++) {
        bound[k] = boundaries[k] * norm;
    }
    const float inv_sqrt_d = inv_sqrt_dim[0];
    if (wanted < rows) {
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
                const uint part = BITS == 3 ? (high ? code >> 2 : code & 3u) : code;
                word |= part << (i * width);
            }
            out[size_t(row) * (W + 1) + w] = word;
        }
        if (lane == 0) {
            out[size_t(row) * (W + 1) + W] = norm_bits[row];
        }
    }
"""

encode_kernel = Kernel(
    name="tq_encode",
    source=ENCODE,
    inputs=["x", "norms", "norm_bits", "sign", "boundaries", "inv_sqrt_dim"],
    outputs=["out"],
)

VECTORS_PER_GROUP = 4
DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def norms_of(x: mx.array) -> mx.array:
    """‖x‖ over the last axis in float32: computed by MLX on every path, so it is always the same."""
    x = x.astype(mx.float32)
    return mx.sqrt(mx.sum(x * x, axis=-1))


def reference(x: mx.array, sign: mx.array, boundaries: mx.array, bits: int) -> mx.array:
    """The definition in MLX ops: [..., D] -> [..., words + 1] uint32 rows."""
    norms = norms_of(x)
    z = fwht(x.astype(mx.float32) * sign) * mx.array(1 / math.sqrt(x.shape[-1]), mx.float32)
    codes = mx.sum(z[..., None] > boundaries * norms[..., None, None], axis=-1).astype(mx.uint32)
    return mx.concatenate([pack(codes, bits), norms.view(mx.uint32)[..., None]], axis=-1)


def supports(x: mx.array) -> bool:
    dim = x.shape[-1]
    return x.dtype in DTYPES and 32 <= dim <= 1024 and dim & (dim - 1) == 0


def encode(x: mx.array, sign: mx.array, boundaries: mx.array, bits: int) -> mx.array:
    """Packed rows of `x` on this device's kernel, or the reference (see module doc)."""
    on = backend()
    if on != "reference" and supports(x):
        config = (on, x.dtype, x.shape[-1], bits)
        if usable(("tq_encode", *config), lambda: _probe(*config)):
            return run(launcher(on), x, sign, boundaries, bits)
    return reference(x, sign, boundaries, bits)


def run(launch: Launcher, x: mx.array, sign: mx.array, boundaries: mx.array, bits: int) -> mx.array:
    """The kernel path through `launch` (a GPU backend, or the tests' CPU emulator)."""
    dim = x.shape[-1]
    flat = x.reshape(-1, dim)
    norms = norms_of(flat)
    groups = -(-flat.shape[0] // VECTORS_PER_GROUP)
    (out,) = launch(
        encode_kernel,
        inputs=[flat, norms, norms.view(mx.uint32), sign, boundaries, _inv_sqrt(dim)],
        template=[("T", x.dtype), ("D", dim), ("BITS", bits), ("VPG", VECTORS_PER_GROUP)],
        grid=(32 * VECTORS_PER_GROUP * groups, 1, 1),
        threadgroup=(32 * VECTORS_PER_GROUP, 1, 1),
        output_shapes=[(flat.shape[0], words(dim, bits) + 1)],
        output_dtypes=[mx.uint32],
    )
    return out.reshape(*x.shape[:-1], -1)


@lru_cache(maxsize=None)
def _inv_sqrt(dim: int) -> mx.array:
    return mx.array([1 / math.sqrt(dim)], mx.float32)


def _probe(on: str, dtype, dim: int, bits: int) -> Optional[str]:
    """Encode a few vectors on the device; None when the rows equal the reference's."""
    from ..turboquant.codec import TurboQuantCodec

    codec = TurboQuantCodec(dim, bits, seed=0)
    x = mx.random.normal((2, 3, 7, dim), key=mx.random.key(0)).astype(dtype)
    got = run(launcher(on), x, codec.sign, codec.boundaries, bits)
    want = reference(x, codec.sign, codec.boundaries, bits)
    differing = mx.sum(got != want).item()
    return None if differing == 0 else f"{differing} of {got.size} words differ from the reference"
