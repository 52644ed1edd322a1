"""The 4-bit quantized GEMV on matrix units: y = x @ dequantize(w).T for 1-8 rows of float16/bfloat16 x.

    y[m, n] = sum_k x[m, k] * (scales[n, k // G] * code[n, k] + biases[n, k // G])

The float GEMV (quantized_matmul.py) spends ~4.6 instructions a code and is bound by instruction issue
on an H100, not by DRAM. Here the multiply-adds go to the 16x8x16 matrix multiply-accumulate
(`mma_16x8x16` of the prelude: NVIDIA's mma.sync on CUDA, shuffles on Metal for the verification
ladder) and a lane only turns codes into 16-bit pairs: ORed into the mantissa of 128.0 (bfloat16) or
1024.0 (float16), code c reads as OFFSET + c exactly, one LOP3 per two codes.

A simdgroup owns 16 weight rows a tile (the MMA's A: lane l holds rows l/4 and l/4 + 8) and walks K in
spans of 4 lanes x CH chunks x 32 codes; lane t of a row reads chunks t, t + 4, ... of the span, 16
contiguous bytes each, so that a warp's load covers 64 contiguous bytes of 8 rows. The order of k
inside an MMA is free as long as A and B agree: B (8 columns) holds x at exactly the codes' positions.
A span holds SLOTS = span / G quantization groups; each (x row, group) gets its own column of B, x
where the chunk belongs to that group and zero elsewhere, so one accumulator column sums one group:
D[n, c] = sum (OFFSET + code) x and, from an MMA with an all-ones A, XS[c] = sum x. Each span then
folds y += scale * D + (bias - OFFSET * scale) * XS in float32, its NB x 8 columns spread over the
lanes. Simdgroups of a threadgroup split K by spans and meet in threadgroup memory; with MATS = 2 a
threadgroup holds the same rows of the MLP's gate and up projections and writes gelu_tanh(gate) * up.

Template: T (x's dtype), GS, M (rows of x), CH, NB, TILES (16-row tiles of each matrix a threadgroup
owns), NSG (simdgroups splitting K), OFFSET and CODE_BITS / ONE (OFFSET and 1.0 as 16-bit pairs of T).
"""

import math
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .kernel import Kernel, Launcher

BODY = r"""
    constexpr int SPAN = 4 * CH * 32;
    constexpr int SLOTS = SPAN / GS;
    constexpr int ATILES = TILES * MATS;  // A tiles: TILES of each matrix
    threadgroup float partial[NSG * ATILES * NB * 128];
    const uint lane = thread_index_in_simdgroup;
    const uint sg = simdgroup_index_in_threadgroup;
    const int g = lane / 4;
    const int t = lane % 4;
    const int words = w_shape[1];
    const int K = words * 8;
    const int N = w_shape[0];
    const int groups = K / GS;
    const int first = threadgroup_position_in_grid.x * 16 * TILES;

    size_t w_row[ATILES][2];
    size_t sb_row[ATILES][2];
    for (int i = 0; i < ATILES; i++) {
        for (int h = 0; h < 2; h++) {
            const int row = metal::min(first + 16 * (i % TILES) + g + 8 * h, N - 1);  // rows past N: never written
            w_row[i][h] = size_t(row) * words;
            sb_row[i][h] = size_t(row) * groups;
        }
    }
    float acc[ATILES][NB][4];
    for (int i = 0; i < ATILES; i++) {
        for (int nb = 0; nb < NB; nb++) {
            for (int e = 0; e < 4; e++) {
                acc[i][nb][e] = 0.0f;
            }
        }
    }
    const uint ones[4] = {uint(ONE), uint(ONE), uint(ONE), uint(ONE)};

    for (int span = sg * SPAN; span < K; span += NSG * SPAN) {
        // Every load from memory first, so that they wait together: this lane's chunks of each row (past K:
        // the row's first, multiplied by zeros) and the scales and biases of its columns' groups (past the
        // last group: the last, unused).
        uint q[ATILES][2][CH][4];
        for (int c = 0; c < CH; c++) {
            const int at = span + (4 * c + t) * 32;
            for (int i = 0; i < ATILES; i++) {
                for (int h = 0; h < 2; h++) {
                    const u32x4 w4 = load_words4(WEIGHTS(i) + w_row[i][h] + (at < K ? at / 8 : 0));
                    for (int j = 0; j < 4; j++) {
                        q[i][h][c][j] = w4.v[j];
                    }
                }
            }
        }
        float scale[ATILES][NB][4];
        float bias[ATILES][NB][4];
        for (int i = 0; i < ATILES; i++) {
            for (int nb = 0; nb < NB; nb++) {
                for (int e = 0; e < 4; e++) {
                    const int col = 8 * nb + 2 * t + (e & 1);
                    const size_t at = sb_row[i][e / 2] + metal::min(span / GS + col % SLOTS, groups - 1);
                    scale[i][nb][e] = static_cast<float>(SCALES(i)[at]);
                    bias[i][nb][e] = static_cast<float>(BIASES(i)[at]) - float(OFFSET) * scale[i][nb][e];
                }
            }
        }
        float d[ATILES][NB][4];
        float xs[NB][4];
        for (int nb = 0; nb < NB; nb++) {
            for (int e = 0; e < 4; e++) {
                xs[nb][e] = 0.0f;
                for (int i = 0; i < ATILES; i++) {
                    d[i][nb][e] = 0.0f;
                }
            }
        }
#pragma unroll
        for (int c = 0; c < CH; c++) {
            const int at = span + (4 * c + t) * 32;
            const int slot = (4 * c + t) * 32 / GS;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                // B: column 8 nb + g of this lane is x row m = col / SLOTS where the chunk is in slot col % SLOTS
                uint xp[NB][4];
                for (int nb = 0; nb < NB; nb++) {
                    const int col = 8 * nb + g;
                    const bool live = at < K && col / SLOTS < M && col % SLOTS == slot;
                    const u32x4 x8 = load_pairs8(x + size_t(live ? col / SLOTS : 0) * K + (live ? at : 0) + 8 * j);
                    // pairs (x[p], x[p + 4]) to meet the codes' pairs
                    xp[nb][0] = live ? pack_low16(x8.v[0], x8.v[2]) : 0u;
                    xp[nb][1] = live ? pack_high16(x8.v[0], x8.v[2]) : 0u;
                    xp[nb][2] = live ? pack_low16(x8.v[1], x8.v[3]) : 0u;
                    xp[nb][3] = live ? pack_high16(x8.v[1], x8.v[3]) : 0u;
                }
                for (int half_ = 0; half_ < 2; half_++) {
                    for (int nb = 0; nb < NB; nb++) {
                        mma_16x8x16(T, xs[nb], ones, xp[nb][2 * half_], xp[nb][2 * half_ + 1], lane);
                    }
                    for (int i = 0; i < ATILES; i++) {
                        // codes (p, p + 4) of each word, p = 2 half_ and 2 half_ + 1: rows g, g + 8
                        const uint s0 = 8u * half_;
                        const uint s1 = 8u * half_ + 4u;
                        const uint a[4] = {and_or(q[i][0][c][j] >> s0, 0x000F000Fu, uint(CODE_BITS)),
                                           and_or(q[i][1][c][j] >> s0, 0x000F000Fu, uint(CODE_BITS)),
                                           and_or(q[i][0][c][j] >> s1, 0x000F000Fu, uint(CODE_BITS)),
                                           and_or(q[i][1][c][j] >> s1, 0x000F000Fu, uint(CODE_BITS))};
                        for (int nb = 0; nb < NB; nb++) {
                            mma_16x8x16(T, d[i][nb], a, xp[nb][2 * half_], xp[nb][2 * half_ + 1], lane);
                        }
                    }
                }
            }
        }
        // Fold each (x row, group) column: lane (g, t) holds columns 2t, 2t + 1 of rows g, g + 8.
        for (int nb = 0; nb < NB; nb++) {
            for (int e = 0; e < 4; e++) {
                const int col = 8 * nb + 2 * t + (e & 1);
                if (col / SLOTS < M && span / GS + col % SLOTS < groups) {
                    for (int i = 0; i < ATILES; i++) {
                        acc[i][nb][e] += scale[i][nb][e] * d[i][nb][e] + bias[i][nb][e] * xs[nb][e];
                    }
                }
            }
        }
    }

    // Simdgroups' sums to threadgroup memory; then one thread per (output row, x row), in turns, adds
    // every simdgroup's and every slot's column of its x row.
    for (int i = 0; i < ATILES; i++) {
        for (int nb = 0; nb < NB; nb++) {
            for (int e = 0; e < 4; e++) {
                partial[((sg * ATILES + i) * NB + nb) * 128 + lane * 4 + e] = acc[i][nb][e];
            }
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int o = thread_index_in_threadgroup; o < TILES * 16 * M; o += 32 * NSG) {
        const int m = o % M;
        const int r = o / M;  // row of the threadgroup: tile r / 16, row r % 16 of it
        float total[MATS];
        for (int mat = 0; mat < MATS; mat++) {
            total[mat] = 0.0f;
            const int i = mat * TILES + r / 16;
            for (int s = 0; s < SLOTS; s++) {
                const int col = m * SLOTS + s;
                const int at = (col / 8) * 128 + (4 * (r % 8) + (col % 8) / 2) * 4 + (r % 16 >= 8 ? 2 : 0) + (col & 1);
                for (int k = 0; k < NSG; k++) {
                    total[mat] += partial[(k * ATILES + i) * NB * 128 + at];
                }
            }
        }
        if (first + r < N) {
            y[size_t(m) * N + first + r] = static_cast<T>(OUTPUT);
        }
    }
"""

GEMV = r"""
#define MATS 1
#define WEIGHTS(i) w
#define SCALES(i) scales
#define BIASES(i) biases
#define OUTPUT total[0]
""" + BODY

# gelu_tanh(gate) * up as the float GEMV writes it (tanh(u) = 1 - 2 / (e^2u + 1))
GEGLU = r"""
#define MATS 2
#define WEIGHTS(i) ((i) < TILES ? w : up_w)
#define SCALES(i) ((i) < TILES ? scales : up_scales)
#define BIASES(i) ((i) < TILES ? biases : up_biases)
#define GATE total[0]
#define OUTPUT (0.5f * GATE * (2.0f - 2.0f / (metal::exp(1.5957691f * (GATE + 0.044715f * GATE * GATE * GATE)) + 1.0f)) \
                * total[1])
""" + BODY

gemv_kernel = Kernel(name="quantized_gemv_mma", source=GEMV, inputs=["x", "w", "scales", "biases"], outputs=["y"])
geglu_kernel = Kernel(name="quantized_gemv_mma_geglu", source=GEGLU,
                      inputs=["x", "w", "scales", "biases", "up_w", "up_scales", "up_biases"], outputs=["y"])

DTYPES = (mx.float16, mx.bfloat16)
# (OFFSET, OFFSET as a pair, 1.0 as a pair) of each dtype's 16-bit codes
CODE_FORMS = {mx.bfloat16: (128, 0x43004300, 0x3F803F80), mx.float16: (1024, 0x64006400, 0x3C003C00)}
TILES_CHOICES = (1, 2, 4)
SIMDGROUPS = (1, 2, 4, 8)
TARGET_SIMDGROUPS = 2048  # simdgroups a default launch aims for: ~16 an SM of an H100


def applies(dtype, bits: int, group_size: int) -> bool:
    return bits == 4 and dtype in DTYPES and group_size in (32, 64, 128)


@lru_cache(maxsize=None)
def columns(group_size: int, rows: int) -> tuple:
    """(CH, NB): chunks a lane reads per row and span, and 8-column B fragments, for G and rows of x. The
    widest span (to 4 chunks: registers) whose SLOTS x rows columns fit one fragment, else more fragments."""
    ch = 1
    while ch < 4 and (4 * ch * 32 // group_size) * 2 * rows <= 8:
        ch *= 2
    slots = max(1, 4 * ch * 32 // group_size)
    return ch, -(-slots * rows // 8)


THREADGROUP_BYTES = 32768  # Apple GPUs' threadgroup memory (CUDA's static shared memory: 48 KB)


def partial_bytes(group_size: int, rows: int, tiles: int, split: int, mats: int) -> int:
    """Threadgroup memory of the simdgroups' partial sums."""
    return 4 * split * tiles * mats * columns(group_size, rows)[1] * 128


@lru_cache(maxsize=None)
def default_launch(k: int, n: int, group_size: int, rows: int, mats: int = 1) -> tuple:
    """(TILES, NSG): 2 tiles, and simdgroups doubled while the launch has fewer than TARGET_SIMDGROUPS,
    each still gets at least one span of K and the partial sums fit the threadgroup."""
    ch, _ = columns(group_size, rows)
    spans = -(-k // (4 * ch * 32))
    tiles = 2
    blocks = -(-n // (16 * tiles))
    split = 1
    while (2 * split <= min(SIMDGROUPS[-1], spans) and blocks * split < TARGET_SIMDGROUPS
           and partial_bytes(group_size, rows, tiles, 2 * split, mats) <= THREADGROUP_BYTES):
        split *= 2
    return tiles, split


@lru_cache(maxsize=None)
def launch(dtype, group_size: int, rows: int, n: int, tiles: int, split: int, mats: int = 1) -> tuple:
    """(template, grid, threadgroup) of one configuration, built once."""
    if tiles not in TILES_CHOICES or split not in SIMDGROUPS:
        raise ValueError(f"MMA GEMV launch TILES {tiles}, NSG {split}: TILES takes {TILES_CHOICES}, NSG {SIMDGROUPS}")
    if partial_bytes(group_size, rows, tiles, split, mats) > THREADGROUP_BYTES:
        raise ValueError(f"MMA GEMV launch TILES {tiles}, NSG {split} for {rows} rows, group {group_size}: its partial "
                         f"sums exceed {THREADGROUP_BYTES} bytes of threadgroup memory; take fewer tiles or simdgroups")
    ch, nb = columns(group_size, rows)
    offset, code_bits, one = CODE_FORMS[dtype]
    template = [("T", dtype), ("GS", group_size), ("M", rows), ("CH", ch), ("NB", nb), ("TILES", tiles),
                ("NSG", split), ("OFFSET", offset), ("CODE_BITS", code_bits), ("ONE", one)]
    return template, (32 * split * -(-n // (16 * tiles)), 1, 1), (32 * split, 1, 1)


def gemv(run: Launcher, x, w, scales, biases, group_size: int, tiles: Optional[int] = None,
         split: Optional[int] = None, up: Optional[tuple] = None) -> mx.array:
    """The kernel through `run` (a GPU backend or the tests' emulator); x [..., K] with 1-8 rows. With `up`
    (the up projection's w, scales, biases), the MLP's gelu_tanh(x @ w.T) * (x @ up.T)."""
    k, n = x.shape[-1], w.shape[0]
    rows, mats = math.prod(x.shape[:-1]), 1 if up is None else 2
    default = default_launch(k, n, group_size, rows, mats)
    template, grid, threadgroup = launch(x.dtype, group_size, rows, n, tiles or default[0], split or default[1], mats)
    kernel, inputs = (gemv_kernel, [x, w, scales, biases]) if up is None else (geglu_kernel, [x, w, scales, biases, *up])
    (y,) = run(kernel, inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
               output_shapes=[(*x.shape[:-1], n)], output_dtypes=[x.dtype])
    return y
