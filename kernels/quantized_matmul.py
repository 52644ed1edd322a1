"""Matmul with an affine-quantized weight (mlx-lm's format), on the path that is fastest for its row count.

    y[m, n] = sum_k x[m, k] * (scales[n, k // G] * code[n, k] + biases[n, k // G])

x [..., K] (float32, float16 or bfloat16); w [N, K * BITS / 32] uint32, each word packing 32 / BITS codes,
lowest bits first; scales and biases [N, K / G]. BITS 4 or 8, group size G 32, 64 or 128. Float
accumulation whatever the dtypes, so `reference` is mx.quantized_matmul on exactly upcast inputs (MLX's
CPU op in bfloat16 is ~10 % off at K = 4096).

Decode reads every weight once per token, so for 1-8 rows (`gemv`) the kernel streams them at memory
speed: a simdgroup owns RPS weight rows and walks K in steps of 32 lanes x one 16-byte word load per
row (32 codes at 4 bits, 16 at 8); the next step's words are loaded before the current step's
arithmetic. A lane's chunk lies inside one quantization group, so it folds its partial dot products as
scale * sum(x * code) + bias * sum(x). The activations come from L1, reused across the RPS rows. Codes
become floats without an int->float conversion (a quarter-rate instruction on NVIDIA GPUs): a code
placed in the mantissa of 2^(23 - s), s its bit offset, reads as 2^(23 - s) + code exactly. simd_sums
reduce the lanes at the end.

Prefill (many rows) is compute-bound: on CUDA, dequantizing the weight into a transient dense matrix
and calling the dense matmul beats MLX's quantized matmul (`dequantized_matmul`; on an H100 at 2048
rows, ~470 against ~130 TFLOP/s as measured for the project's issue). `DISPATCH` says
which path serves how many rows on each backend; `MLX_GEMMA4_QUANTIZED_MATMUL` overrides it.
"""

import math
import os
from typing import Optional

import mlx.core as mx

from .kernel import Kernel, Launcher, backend, launcher, usable

GEMV = r"""
    // Template: T (output dtype), BITS, GS (group size), M (rows of x), RPS (weight rows per
    // simdgroup), NSG (simdgroups per threadgroup).
    constexpr int VPW = 32 / BITS;   // codes per word
    constexpr int VPL = 4 * VPW;     // codes a lane takes per step: one 16-byte load per weight row
    constexpr int STEP = 32 * VPL;   // codes a simdgroup takes per step
    constexpr uint MASK = (1u << BITS) - 1u;
    const uint lane = thread_index_in_simdgroup;
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int words = K / VPW;
    const int groups = K / GS;
    const int first = (threadgroup_position_in_grid.x * NSG + simdgroup_index_in_threadgroup) * RPS;

    size_t w_row[RPS];
    size_t sb_row[RPS];
    float acc[RPS][M];
    for (int r = 0; r < RPS; r++) {
        const int row = metal::min(first + r, N - 1);  // rows past N re-read the last one, never written
        w_row[r] = size_t(row) * words;
        sb_row[r] = size_t(row) * groups;
        for (int m = 0; m < M; m++) {
            acc[r][m] = 0.0f;
        }
    }

    int k = lane * VPL;
    uint q[RPS][4];
    for (int r = 0; r < RPS; r++) {
        const u32x4 words4 = load_words4(w + w_row[r] + metal::min(k, K - VPL) / VPW);
        for (int i = 0; i < 4; i++) {
            q[r][i] = words4.v[i];
        }
    }
    for (; k < K; k += STEP) {
        // The next step's words first (past the end: the last chunk again, unused), so that they are in
        // flight during this step's arithmetic.
        const int next = metal::min(k + STEP, K - VPL);
        uint q_next[RPS][4];
        float scale[RPS];
        float bias[RPS];
        for (int r = 0; r < RPS; r++) {
            const u32x4 words4 = load_words4(w + w_row[r] + next / VPW);
            for (int i = 0; i < 4; i++) {
                q_next[r][i] = words4.v[i];
            }
            scale[r] = static_cast<float>(scales[sb_row[r] + k / GS]);
            bias[r] = static_cast<float>(biases[sb_row[r] + k / GS]);
        }
        float x_sum[M];
        float dot[RPS][M];
        for (int m = 0; m < M; m++) {
            x_sum[m] = 0.0f;
            for (int r = 0; r < RPS; r++) {
                dot[r][m] = 0.0f;
            }
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float xv[M][VPW];
            for (int m = 0; m < M; m++) {
                for (int c = 0; c < VPW; c += 4) {
                    f32x4 t = load4(x + size_t(m) * K + k + j * VPW + c);
                    xv[m][c] = t.x;
                    xv[m][c + 1] = t.y;
                    xv[m][c + 2] = t.z;
                    xv[m][c + 3] = t.w;
                    x_sum[m] += t.x + t.y + t.z + t.w;
                }
            }
            for (int r = 0; r < RPS; r++) {
                const uint low = q[r][j];
                const uint high = low >> 16;  // codes of the high half word, so that every offset is < 16
#pragma unroll
                for (int v = 0; v < VPW; v++) {
                    const uint s = (v % (VPW / 2)) * BITS;
                    const uint bits = ((v < VPW / 2 ? low : high) & (MASK << s)) | ((150u - s) << 23);
                    const float code = bits_to_float(bits) - float(1u << (23u - s));
                    for (int m = 0; m < M; m++) {
                        dot[r][m] += xv[m][v] * code;
                    }
                }
            }
        }
        for (int r = 0; r < RPS; r++) {
            for (int m = 0; m < M; m++) {
                acc[r][m] += scale[r] * dot[r][m] + bias[r] * x_sum[m];
            }
            for (int i = 0; i < 4; i++) {
                q[r][i] = q_next[r][i];
            }
        }
    }

    for (int r = 0; r < RPS; r++) {
        for (int m = 0; m < M; m++) {
            const float total = simd_sum(acc[r][m]);
            if (lane == 0 && first + r < N) {
                y[size_t(m) * N + first + r] = static_cast<T>(total);
            }
        }
    }
"""

gemv_kernel = Kernel(name="quantized_gemv", source=GEMV, inputs=["x", "w", "scales", "biases"], outputs=["y"])

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
MAX_ROWS = 8  # rows of x the GEMV takes; its arithmetic grows with them, its weight reads do not
ROWS_PER_SIMDGROUP = 4
SIMDGROUPS = 2


def reference(x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    """The definition: MLX's quantized matmul in float32 (every input upcasts exactly)."""
    f32 = mx.float32
    y = mx.quantized_matmul(
        x.astype(f32), w, scales.astype(f32), biases.astype(f32), transpose=True, group_size=group_size, bits=bits
    )
    return y.astype(x.dtype)


def mlx_matmul(x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    """MLX's own op, as nn.QuantizedLinear calls it."""
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def dequantized_matmul(x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    """Prefill: the weight dequantized into a dense matrix that lives only for this op, then the dense
    matmul (tensor cores). The weight rounds to the scales' dtype, as a bf16 model's dense weight would."""
    return x @ mx.dequantize(w, scales, biases, group_size, bits).T


def supports(x, w, scales, biases, group_size: int, bits: int) -> bool:
    """Inputs the GEMV kernel takes; anything else goes to MLX's op."""
    k = x.shape[-1]
    return (
        bits in BITS
        and group_size in GROUP_SIZES
        and biases is not None
        and x.dtype in DTYPES
        and 1 <= x.size // max(k, 1) <= MAX_ROWS
        and w.dtype == mx.uint32
        and w.ndim == 2
        and w.shape[1] * 32 == k * bits
        and k % group_size == 0
        and scales.shape == biases.shape == (w.shape[0], k // group_size)
    )


def gemv(launch: Launcher, x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    """The kernel path through `launch` (a GPU backend, or the tests' CPU emulator)."""
    *lead, k = x.shape
    rows, n = math.prod(lead), w.shape[0]
    per_threadgroup = ROWS_PER_SIMDGROUP * SIMDGROUPS
    (y,) = launch(
        gemv_kernel,
        inputs=[x.reshape(rows, k), w, scales, biases],
        template=[
            ("T", x.dtype),
            ("BITS", bits),
            ("GS", group_size),
            ("M", rows),
            ("RPS", ROWS_PER_SIMDGROUP),
            ("NSG", SIMDGROUPS),
        ],
        grid=(32 * SIMDGROUPS * -(-n // per_threadgroup), 1, 1),
        threadgroup=(32 * SIMDGROUPS, 1, 1),
        output_shapes=[(rows, n)],
        output_dtypes=[x.dtype],
    )
    return y.reshape(*lead, n)


# The dispatch table: which path serves a matmul of `rows` activation rows on each backend, as
# (most rows, path) in increasing order. CUDA: the GEMV up to its 8 rows; the dequantize threshold (32)
# is an estimate (4.5 bytes moved per weight against MLX's 0.5 at a fraction of bandwidth) until
# benchmarks/quantized_matmul.py's crossover rows on an H100 set it.
# Metal: MLX's own everywhere; its quantized GEMV is near bandwidth on Apple GPUs and nothing here can
# time ours there (force ours with the environment variable to compare on a Mac).
INF = math.inf
DISPATCH = {
    "cuda": ((MAX_ROWS, "gemv"), (31, "mlx"), (INF, "dequantize")),
    "metal": ((INF, "mlx"),),
    "reference": ((INF, "mlx"),),
}
PATH_ENV = "MLX_GEMMA4_QUANTIZED_MATMUL"
PATHS = ("gemv", "dequantize", "mlx")


def path(x, w, scales, biases, group_size: int, bits: int) -> str:
    """The path `quantized_matmul` takes for these inputs: the table's, or the environment's
    (`gemv` only where the kernel applies: a GPU backend and inputs it supports)."""
    choice = os.environ.get(PATH_ENV, "auto")
    if choice not in ("auto", *PATHS):
        raise ValueError(f"{PATH_ENV}={choice!r}: choose one of {', '.join(PATHS)} or auto")
    on = backend()
    if choice == "auto":
        rows = x.size // max(x.shape[-1], 1)
        choice = next(name for most, name in DISPATCH[on] if rows <= most)
    if choice == "gemv" and (on == "reference" or not supports(x, w, scales, biases, group_size, bits)):
        return "mlx"
    return choice


def quantized_matmul(x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    """x @ dequantize(w).T, [..., N], on the path the dispatch table picks (see module doc)."""
    chosen = path(x, w, scales, biases, group_size, bits)
    if chosen == "gemv":
        on = backend()
        config = (on, x.dtype, bits, group_size, x.size // x.shape[-1])
        if usable(("quantized_gemv", *config), lambda: _probe(*config)):
            return gemv(launcher(on), x, w, scales, biases, group_size, bits)
        chosen = "mlx"
    if chosen == "dequantize":
        return dequantized_matmul(x, w, scales, biases, group_size, bits)
    return mlx_matmul(x, w, scales, biases, group_size, bits)


# Largest |ours - reference| allowed, relative to the largest |reference|: float32 summation order, or
# about one unit in the last place of the output dtype.
TOLERANCE = {mx.float32: 1e-5, mx.float16: 1e-3, mx.bfloat16: 8e-3}


def error(got, want) -> float:
    """Max |got - want| relative to max |want|, in float32."""
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    return (mx.abs(got - want).max() / mx.maximum(mx.abs(want).max(), 1e-30)).item()


def quantized_case(rows: int, k: int, n: int, dtype, group_size: int, bits: int, seed: int = 0) -> tuple:
    """(x, w, scales, biases): x ~ N(0, 1) and a quantized N(0, 1) weight, as mx.quantize makes them."""
    keys = mx.random.split(mx.random.key(seed), 2)
    x = mx.random.normal((rows, k), key=keys[0]).astype(dtype)
    weight = mx.random.normal((n, k), key=keys[1]).astype(dtype)
    return (x, *mx.quantize(weight, group_size, bits))


def _probe(on: str, dtype, bits: int, group_size: int, rows: int) -> Optional[str]:
    """Run one small case of this configuration on the device; None when it matches the reference."""
    x, w, scales, biases = quantized_case(rows, 3 * 128 + 2 * 1024, 13, dtype, group_size, bits)
    got = gemv(launcher(on), x, w, scales, biases, group_size, bits)
    gap = error(got, reference(x, w, scales, biases, group_size, bits))
    return None if gap <= TOLERANCE[dtype] else f"relative error {gap:.3g} > {TOLERANCE[dtype]}"
