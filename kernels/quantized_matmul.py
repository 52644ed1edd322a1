"""Matmul with an affine-quantized weight (mlx-lm's format), on the path that is fastest for its row count.

    y[m, n] = sum_k x[m, k] * (scales[n, k // G] * code[n, k] + biases[n, k // G])

x [..., K] (float32, float16 or bfloat16); w [N, K * BITS / 32] uint32, each word packing 32 / BITS codes,
lowest bits first; scales and biases [N, K / G]. BITS 4 or 8, group size G 32, 64 or 128. Float
accumulation whatever the dtypes, so `reference` is mx.quantized_matmul on exactly upcast inputs (MLX's
CPU op in bfloat16 is ~10 % off at K = 4096).

Decode reads every weight once per token, so for 1-8 rows (`gemv`) the kernel streams them at memory
speed. A threadgroup owns RPS weight rows and NSG simdgroups that split K between them: its lanes
walk K in steps of NSG x 32 lanes x one 16-byte word per row (32 codes at 4 bits, 16 at 8), and the
next step's words, scales and biases are loaded before the current step's arithmetic, so that a lane
never waits on memory it could have asked for earlier. The launch shape (RPS, NSG) comes from
`LAUNCH_SHAPES` per backend and weight shape (benchmarks/gemv_kernel_time.py times them all); by default
RPS = 4 and NSG (`simdgroups`) grows for short N until the launch has enough simdgroups to fill an
H100. Each simdgroup's sums meet in threadgroup memory. A lane's chunk lies inside one quantization
group, so it folds its partial dot products as scale * sum(x * code) + bias * sum(x). The activations
come from L1, reused across the RPS rows. Codes become floats two at a time through float16 pairs
(`UNPACK_CODES`), without an int->float conversion (a quarter-rate instruction on NVIDIA GPUs). On an
H100, by GPU time, it streams 31B's 50-130 MB weights at 66-80 % of the copy bandwidth and its lm_head at
94 %; a few-MB weight is bound by the kernel's ~4-8 µs floor (benchmarks/results/gemv_kernel_time.md).
Fewer instructions do not move it: a matrix-unit body at 1.85 instructions a code against this one's 4.6
was no faster (gemv_mma.md). The body's template: T (output dtype), BITS, GS (group
size), M (rows of x), RPS, NSG; `Kernel.build` strips its comments, since MLX builds and hashes the
whole source on every call.

The call path is short on purpose (a decode step on MLX's CUDA backend is bound by host time, so
every microsecond of Python shows): `plan` resolves the path, the probe, the kernel object and its
launch parameters once per input signature into a closure that only launches; our layers
(model/quantized_linear.py) keep one plan per signature. `quantized_matmul` plans on every call, for
tests and scripts.

Prefill (many rows) is compute-bound: on CUDA, dequantizing the weight into a transient dense matrix
and calling the dense matmul beats MLX's quantized matmul from a few hundred rows (`dequantized_matmul`;
on an H100 at 2048 rows, ~470 against ~130 TFLOP/s). `DISPATCH` says which path serves how many rows
of how large a weight on each backend; `MLX_GEMMA4_QUANTIZED_MATMUL` overrides it.
"""

import math
import os
from functools import lru_cache
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .kernel import Kernel, Launcher, backend, launcher, usable

# `float code[8]` from the uint `word`: its 32 / BITS codes as floats, two per float16 pair. ORed into the
# mantissa of 1024.0h (0x6400), a code c reads as 1024 + c, or as 1024 + 16c four bits up; one float16 FMA
# per pair makes it c exactly. (The float32 way, a code ORed into 2^23's mantissa, takes two LOP3s and an
# FADD per code on NVIDIA GPUs: SASS operands hold one immediate.) A macro, so that bodies that unpack
# words (here and moe_weights.py) share it.
UNPACK_CODES = r"""
#define UNPACK_CODES \
    float code[8]; \
    if (BITS == 4) { \
        const f32x2 c04 = half_pair(and_or(word, 0x000F000Fu, 0x64006400u), 1.0f, -1024.0f); \
        const f32x2 c15 = half_pair(and_or(word, 0x00F000F0u, 0x64006400u), 0.0625f, -64.0f); \
        const f32x2 c26 = half_pair(and_or(word >> 8, 0x000F000Fu, 0x64006400u), 1.0f, -1024.0f); \
        const f32x2 c37 = half_pair(and_or(word >> 8, 0x00F000F0u, 0x64006400u), 0.0625f, -64.0f); \
        code[0] = c04.x; code[1] = c15.x; code[2] = c26.x; code[3] = c37.x; \
        code[4] = c04.y; code[5] = c15.y; code[6] = c26.y; code[7] = c37.y; \
    } else { \
        const f32x2 c02 = half_pair(and_or(word, 0x00FF00FFu, 0x64006400u), 1.0f, -1024.0f); \
        const f32x2 c13 = half_pair(and_or(word >> 8, 0x00FF00FFu, 0x64006400u), 1.0f, -1024.0f); \
        code[0] = c02.x; code[1] = c13.x; code[2] = c02.y; code[3] = c13.y; \
    }
"""

ROWS_BODY = UNPACK_CODES + r"""
    constexpr int VPW = 32 / BITS;
    constexpr int VPL = 4 * VPW;
    constexpr int STEP = 32 * NSG * VPL;
    constexpr int ROWS = RPS * MATS;  // RPS rows of each of the MATS weight matrices
    threadgroup float partial[NSG * ROWS * M];
    const uint lane = thread_index_in_simdgroup;
    const uint tid = thread_index_in_threadgroup;
    const int words = w_shape[1];
    const int K = words * VPW;
    const int N = w_shape[0];
    const int groups = K / GS;
    const int first = threadgroup_position_in_grid.x * RPS;

    size_t w_row[ROWS];
    size_t sb_row[ROWS];
    float acc[ROWS][M];
    for (int r = 0; r < ROWS; r++) {
        const int row = metal::min(first + r % RPS, N - 1);  // rows past N re-read the last one, never written
        w_row[r] = size_t(row) * words;
        sb_row[r] = size_t(row) * groups;
        for (int m = 0; m < M; m++) {
            acc[r][m] = 0.0f;
        }
    }

    int k = tid * VPL;
    uint q[ROWS][4];
    float scale[ROWS];
    float bias[ROWS];
    for (int r = 0; r < ROWS; r++) {
        const int at = metal::min(k, K - VPL);
        const u32x4 words4 = load_words4(WEIGHTS(r) + w_row[r] + at / VPW);
        for (int i = 0; i < 4; i++) {
            q[r][i] = words4.v[i];
        }
        scale[r] = static_cast<float>(SCALES(r)[sb_row[r] + at / GS]);
        bias[r] = static_cast<float>(BIASES(r)[sb_row[r] + at / GS]);
    }
    for (; k < K; k += STEP) {
        // The next step's words, scales and biases first (past the end: the last chunk again, unused),
        // so that they are in flight during this step's arithmetic.
        const int next = metal::min(k + STEP, K - VPL);
        uint q_next[ROWS][4];
        float scale_next[ROWS];
        float bias_next[ROWS];
        for (int r = 0; r < ROWS; r++) {
            const u32x4 words4 = load_words4(WEIGHTS(r) + w_row[r] + next / VPW);
            for (int i = 0; i < 4; i++) {
                q_next[r][i] = words4.v[i];
            }
            scale_next[r] = static_cast<float>(SCALES(r)[sb_row[r] + next / GS]);
            bias_next[r] = static_cast<float>(BIASES(r)[sb_row[r] + next / GS]);
        }
        float x_sum[M];
        float dot[ROWS][M];
        for (int m = 0; m < M; m++) {
            x_sum[m] = 0.0f;
            for (int r = 0; r < ROWS; r++) {
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
            for (int r = 0; r < ROWS; r++) {
                const uint word = q[r][j];
                UNPACK_CODES
#pragma unroll
                for (int v = 0; v < VPW; v++) {
                    for (int m = 0; m < M; m++) {
                        dot[r][m] += xv[m][v] * code[v];
                    }
                }
            }
        }
        for (int r = 0; r < ROWS; r++) {
            for (int m = 0; m < M; m++) {
                acc[r][m] += scale[r] * dot[r][m] + bias[r] * x_sum[m];
            }
            for (int i = 0; i < 4; i++) {
                q[r][i] = q_next[r][i];
            }
            scale[r] = scale_next[r];
            bias[r] = bias_next[r];
        }
    }

    // Each simdgroup's sums to threadgroup memory, then one thread per (output row, x row) (taken in
    // turns when the threadgroup has fewer) adds the NSG partial sums of each matrix in simdgroup order.
    for (int r = 0; r < ROWS; r++) {
        for (int m = 0; m < M; m++) {
            const float total = simd_sum(acc[r][m]);
            if (lane == 0) {
                partial[simdgroup_index_in_threadgroup * (ROWS * M) + r * M + m] = total;
            }
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int i = tid; i < RPS * M; i += 32 * NSG) {
        const int r = i / M;
        const int m = i % M;
        float total[MATS];
        for (int j = 0; j < MATS; j++) {
            total[j] = 0.0f;
            for (int g = 0; g < NSG; g++) {
                total[j] += partial[g * (ROWS * M) + j * (RPS * M) + i];
            }
        }
        if (first + r < N) {
            y[size_t(m) * N + first + r] = static_cast<T>(OUTPUT);
        }
    }
"""

# One weight matrix: y = x @ w.T.
GEMV = r"""
#define MATS 1
#define WEIGHTS(r) w
#define SCALES(r) scales
#define BIASES(r) biases
#define OUTPUT total[0]
""" + ROWS_BODY

# The MLP's gate and up projections in one pass over x: y = gelu_tanh(x @ w.T) * (x @ up_w.T), each
# threadgroup's rows of both (tanh(u) = 1 - 2 / (e^2u + 1): the CUDA prelude has exp, not tanh).
GEGLU = r"""
#define MATS 2
#define WEIGHTS(r) ((r) < RPS ? w : up_w)
#define SCALES(r) ((r) < RPS ? scales : up_scales)
#define BIASES(r) ((r) < RPS ? biases : up_biases)
#define GATE total[0]
#define OUTPUT (0.5f * GATE * (2.0f - 2.0f / (metal::exp(1.5957691f * (GATE + 0.044715f * GATE * GATE * GATE)) + 1.0f)) \
                * total[1])
""" + ROWS_BODY

gemv_kernel = Kernel(name="quantized_gemv", source=GEMV, inputs=["x", "w", "scales", "biases"], outputs=["y"])
geglu_kernel = Kernel(name="quantized_gemv_geglu", source=GEGLU,
                      inputs=["x", "w", "scales", "biases", "up_w", "up_scales", "up_biases"], outputs=["y"])

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
MAX_ROWS = 8  # rows of x the GEMV takes; its arithmetic grows with them, its weight reads do not
ROWS_PER_THREADGROUP = 4  # the default RPS
RPS_CHOICES = (1, 2, 4, 8, 16)  # weight rows a threadgroup may own (registers grow with them)
SIMDGROUPS = (1, 2, 4, 8)  # the split of K a threadgroup may take
# Simdgroups a launch aims for: about 31 per SM of an H100's 132, which keeps enough loads in flight
# to cover memory latency. Fewer weight rows than this split K further (short N, e.g. 2048-5376).
TARGET_SIMDGROUPS = 4096


@lru_cache(maxsize=None)
def simdgroups(k: int, n: int, bits: int, rps: int = ROWS_PER_THREADGROUP) -> int:
    """How many simdgroups split K in each threadgroup of `rps` rows: doubled while the launch has fewer
    than TARGET_SIMDGROUPS and each still gets at least one full step of K."""
    steps = k // (32 * 4 * 32 // bits)
    threadgroups = -(-n // rps)
    split = 1
    while 2 * split <= min(SIMDGROUPS[-1], steps) and threadgroups * split < TARGET_SIMDGROUPS:
        split *= 2
    return split


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
    w = mx.depends([w], [x])[0]  # not before x: MLX would dequantize every layer's weight up front
    return x @ mx.dequantize(w, scales, biases, group_size, bits).T


def supports(x, w, scales, biases, group_size: int, bits: int) -> bool:
    """Inputs the GEMV kernel takes; anything else goes to MLX's op."""
    return biases is not None and _supports(x.shape, x.dtype, w.shape, w.dtype, scales.shape, biases.shape,
                                            group_size, bits)


def _supports(x_shape, x_dtype, w_shape, w_dtype, scales_shape, biases_shape, group_size, bits) -> bool:
    k = x_shape[-1]
    return (
        bits in BITS
        and group_size in GROUP_SIZES
        and x_dtype in DTYPES
        and 1 <= math.prod(x_shape[:-1]) <= MAX_ROWS
        and w_dtype == mx.uint32
        and len(w_shape) == 2
        and w_shape[1] * 32 == k * bits
        and k % group_size == 0
        and scales_shape == biases_shape == (w_shape[0], k // group_size)
    )


# The GEMV's launch shape, (RPS, NSG), by weight shape on each backend: rules (most rows of x, fewest K,
# most K, fewest N, most N, RPS, NSG), the first that matches wins; none: RPS 4 and `simdgroups`'s NSG.
# Fill from the GPU's own time of each launch (benchmarks/gemv_kernel_time.py, under Nsight Compute);
# a rule for the gate/up shape also shapes the fused gate/up GEMV, timed beside it.
LAUNCH_SHAPES = {
    # H100, 1 row, 4-bit g64, by GPU time alone (Nsight Compute: benchmarks/results/gemv_kernel_time.md,
    # session 8; wall clock measured the host's launch cost at the small shapes). RPS 4 x NSG 2 is the
    # fastest or within ~5 % of it on 17 of the 22 shapes of 31B, E2B and 26B-A4B's dense branch, the fused
    # gate/up GEMVs included (31B o_proj global 25 against 34 us at the old 8x1); the lm_heads stream best
    # at 8x1 (E2B 102 against 119 us).
    "cuda": (
        (1, 0, math.inf, 262144, math.inf, 8, 1),
        (1, 0, math.inf, 0, math.inf, 4, 2),
    ),
    "metal": (),
    "reference": (),
}


@lru_cache(maxsize=None)
def launch_shape(on: str, k: int, n: int, rows: int, bits: int) -> tuple:
    """(RPS, NSG) of the GEMV for x [rows, K] and a weight [N, ...] on backend `on`."""
    for most_rows, fewest_k, most_k, fewest_n, most_n, rps, split in LAUNCH_SHAPES[on]:
        if rows <= most_rows and fewest_k <= k <= most_k and fewest_n <= n <= most_n:
            return rps, split
    return ROWS_PER_THREADGROUP, simdgroups(k, n, bits)


@lru_cache(maxsize=None)
def _launch(dtype, bits: int, group_size: int, rows: int, n: int, rps: int, split: int) -> tuple:
    """(template, grid, threadgroup) of one GEMV configuration, built once: the call path is short."""
    if rps not in RPS_CHOICES or split not in SIMDGROUPS:
        raise ValueError(f"GEMV launch shape RPS {rps}, NSG {split}: RPS takes {RPS_CHOICES}, NSG {SIMDGROUPS}")
    template = [("T", dtype), ("BITS", bits), ("GS", group_size), ("M", rows), ("RPS", rps), ("NSG", split)]
    return template, (32 * split * -(-n // rps), 1, 1), (32 * split, 1, 1)


def gemv(launch: Launcher, x, w, scales, biases, group_size: int, bits: int, split: Optional[int] = None,
         up: Optional[tuple] = None, rps: Optional[int] = None) -> mx.array:
    """The kernel path through `launch` (a GPU backend, or the tests' CPU emulator). Its launch shape:
    `rps` weight rows and `split` simdgroups per threadgroup; neither given, `launch_shape` on the
    backend at hand; one given, RPS 4 or `simdgroups(K, N, bits, rps)` for the other (tests,
    benchmarks). x may have any leading dimensions: the body takes K from the weight and treats x as
    rows. With `up` (the up projection's w, scales, biases, same format and shape), the MLP's fused
    gelu_tanh(x @ w.T) * (x @ up.T)."""
    k, n = x.shape[-1], w.shape[0]
    if split is None and rps is None:
        rps, split = launch_shape(backend(), k, n, x.size // k, bits)
    rps = rps or ROWS_PER_THREADGROUP
    split = split or simdgroups(k, n, bits, rps)
    template, grid, threadgroup = _launch(x.dtype, bits, group_size, x.size // k, n, rps, split)
    kernel, inputs = (gemv_kernel, [x, w, scales, biases]) if up is None else (geglu_kernel, [x, w, scales, biases, *up])
    (y,) = launch(kernel, inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                  output_shapes=[(*x.shape[:-1], n)], output_dtypes=[x.dtype])
    return y


def geglu_reference(x, gate: tuple, up: tuple, group_size: int, bits: int) -> mx.array:
    """The fused MLP input's definition: both matmuls and the GeGLU in float32."""
    f32 = x.astype(mx.float32)
    gate, up = (reference(f32, *weights, group_size, bits) for weights in (gate, up))
    return (nn.gelu_approx(gate) * up).astype(x.dtype)


# The dispatch rule: on each backend, rules (fewest rows, most rows, fewest weight bytes, path), the
# first that matches the rows of x and the quantized weight's bytes (codes, scales and biases: what a
# GEMV reads) wins; none: MLX's op. CUDA, from the H100 measurements in
# benchmarks/results/quantized_matmul.md (4-bit, group 64, bf16):
# - GEMV against MLX's op: 1 row wins from ~25 MB (31B q_proj 5376x8192 1.0x, o_proj 1.25x, gate/up
#   1.44x, lm_heads 1.6-1.97x; 0.35-0.83x below), 2 rows from ~10 MB (7.7 MB: 1.03x, 5-6.5 MB:
#   0.67-0.82x), 4 rows from ~6 MB (3.3-3.5 MB: 0.75-1.06x). MLX's op runs a GEMV up to 7 rows, its time
#   growing with them, so 3 rows take 2 rows' threshold and 5-7 rows 4 rows'. At 8 rows MLX's op
#   switches to its matmul kernel and wins everywhere.
# - Dequantize + matmul: from 256 rows on 31B gate/up (65 MB; 497 vs 608 us, 729 vs 1893 at 1024 rows,
#   loses at 128), never up to 1024 rows on E2B q_proj (1536x2048, 1.8 MB); at 2048 rows 1.1-4.5x from
#   ~1.8 MB up, 0.8-0.97x below.
# Metal: MLX's own everywhere; its quantized GEMV is near bandwidth on Apple GPUs and nothing here has
# timed ours there (force ours with the environment variable to compare on a Mac).
INF = math.inf
DISPATCH = {
    "cuda": (
        (1, 1, 24e6, "gemv"),
        (2, 3, 10e6, "gemv"),
        (4, 7, 6e6, "gemv"),
        (256, INF, 9e6, "dequantize"),
        (2048, INF, 1.5e6, "dequantize"),
    ),
    "metal": (),
    "reference": (),
}
PATH_ENV = "MLX_GEMMA4_QUANTIZED_MATMUL"
PATHS = ("gemv", "dequantize", "mlx")


def dequantizes_from(choice: str, on: str) -> float:
    """The fewest rows of x for which path `choice` (auto or one of PATHS) dequantizes some weight on
    backend `on`; infinity if it never does."""
    if choice == "dequantize":
        return 1
    if choice != "auto":
        return INF
    return min((fewest for fewest, _, _, name in DISPATCH[on] if name == "dequantize"), default=INF)


def path(x, w, scales, biases, group_size: int, bits: int) -> str:
    """The path `quantized_matmul` takes for these inputs: the table's, or the environment's
    (`gemv` only where the kernel applies: a GPU backend and inputs it supports)."""
    return _path(os.environ.get(PATH_ENV, "auto"), backend(), *_signature(x, w, scales, biases), group_size, bits)


def _signature(x, w, scales, biases) -> tuple:
    return (x.shape, x.dtype, w.shape, w.dtype, scales.shape, scales.dtype, None if biases is None else biases.shape)


@lru_cache(maxsize=4096)
def _path(choice, on, x_shape, x_dtype, w_shape, w_dtype, scales_shape, scales_dtype, biases_shape, group_size, bits):
    """`path` on the inputs' shapes and dtypes, decided once per layer shape."""
    if choice not in ("auto", *PATHS):
        raise ValueError(f"{PATH_ENV}={choice!r}: choose one of {', '.join(PATHS)} or auto")
    if choice == "auto":
        rows = math.prod(x_shape[:-1])
        nbytes = math.prod(w_shape) * w_dtype.size + 2 * math.prod(scales_shape) * scales_dtype.size
        choice = next((name for fewest, most, least_bytes, name in DISPATCH[on]
                       if fewest <= rows <= most and nbytes >= least_bytes), "mlx")
    gemv_applies = on != "reference" and biases_shape is not None and _supports(
        x_shape, x_dtype, w_shape, w_dtype, scales_shape, biases_shape, group_size, bits)
    return "mlx" if choice == "gemv" and not gemv_applies else choice


# A plan computes x @ dequantize(w).T for one input signature: plan(x, w, scales, biases) -> y. Built once
# per layer and signature (the layers keep theirs), it holds everything a call needs and decides nothing:
# a decode step makes ~400 such calls, and on MLX's CUDA backend the step is bound by their host cost.
Plan = Callable[[mx.array, mx.array, mx.array, Optional[mx.array]], mx.array]


def plan(choice: str, on: str, x, w, scales, biases, group_size: int, bits: int) -> Plan:
    """The plan for inputs like these on backend `on`, `choice` the path asked for (auto or one of
    PATHS). The first plan of a GEMV configuration probes it on the device (`usable`): call this
    outside mx.compile."""
    chosen = _path(choice, on, *_signature(x, w, scales, biases), group_size, bits)
    if chosen == "gemv":
        k, n = x.shape[-1], w.shape[0]
        shape = launch_shape(on, k, n, x.size // k, bits)
        config = (on, x.dtype, bits, group_size, x.size // k, *shape)
        if usable(("quantized_gemv", *config), lambda: _probe(*config)):
            return _gemv_plan(gemv_kernel.build(on), x.shape, x.dtype, n, group_size, bits, *shape)
        chosen = "mlx"
    if chosen == "dequantize":
        return lambda x, w, scales, biases: dequantized_matmul(x, w, scales, biases, group_size, bits)
    return lambda x, w, scales, biases: mx.quantized_matmul(x, w, scales, biases, True, group_size, bits)


def _gemv_plan(call, x_shape, dtype, n: int, group_size: int, bits: int, rps: int = ROWS_PER_THREADGROUP,
               split: Optional[int] = None) -> Plan:
    split = split or simdgroups(x_shape[-1], n, bits, rps)
    template, grid, threadgroup = _launch(dtype, bits, group_size, math.prod(x_shape[:-1]), n, rps, split)
    output_shapes, output_dtypes = [(*x_shape[:-1], n)], [dtype]

    def run(x, *weights):
        return call(inputs=[x, *weights], template=template, grid=grid, threadgroup=threadgroup,
                    output_shapes=output_shapes, output_dtypes=output_dtypes)[0]

    return run


def geglu_plan(choice: str, on: str, x, w, scales, biases, group_size: int, bits: int) -> Optional[Callable]:
    """The MLP's fused gate/up GEMV for inputs like these, run(x, *gate, *up) -> gelu_tanh(gate) * up, where
    the gate projection's own path is the GEMV (arguments as `plan`'s); else None."""
    if _path(choice, on, *_signature(x, w, scales, biases), group_size, bits) != "gemv":
        return None
    k, n = x.shape[-1], w.shape[0]
    shape = launch_shape(on, k, n, x.size // k, bits)
    config = (on, x.dtype, bits, group_size, x.size // k, *shape)
    if not usable(("quantized_gemv_geglu", *config), lambda: _probe(*config, fused=True)):
        return None
    return _gemv_plan(geglu_kernel.build(on), x.shape, x.dtype, n, group_size, bits, *shape)


def quantized_matmul(x, w, scales, biases, group_size: int, bits: int) -> mx.array:
    """x @ dequantize(w).T, [..., N], on the path the dispatch table picks (see module doc). Reads the
    environment and plans on every call: for tests and scripts; layers keep their plans."""
    return plan(os.environ.get(PATH_ENV, "auto"), backend(), x, w, scales, biases, group_size, bits)(x, w, scales, biases)


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


def _probe(on: str, dtype, bits: int, group_size: int, rows: int, rps: int, split: int,
           fused: bool = False) -> Optional[str]:
    """Run one small case of this configuration on the device; None when it matches the reference.
    K spans several steps of the whole threadgroup and ends in a partial one; N ends in a partial
    threadgroup."""
    k = 2 * split * (32 * 4 * 32 // bits) + 3 * 128
    n = 3 * rps + 1
    x, w, scales, biases = quantized_case(rows, k, n, dtype, group_size, bits)
    if fused:
        up = quantized_case(rows, k, n, dtype, group_size, bits, seed=1)[1:]
        got = gemv(launcher(on), x, w, scales, biases, group_size, bits, split, up=up, rps=rps)
        want = geglu_reference(x, (w, scales, biases), up, group_size, bits)
    else:
        got = gemv(launcher(on), x, w, scales, biases, group_size, bits, split, rps=rps)
        want = reference(x, w, scales, biases, group_size, bits)
    gap = error(got, want)
    return None if gap <= TOLERANCE[dtype] else f"relative error {gap:.3g} > {TOLERANCE[dtype]}"
