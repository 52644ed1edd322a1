"""Spike: a quantized GEMV on NVIDIA tensor cores, timed against our GEMV and MLX's op (not used by the model).

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.gemv_tensor_core_spike --out FILE

Our GEMV (kernels/quantized_matmul.py) spends ~4.6 instructions a 4-bit code (SASS of its loop: a float16
pair's LOP3 and FMA per two codes, then a conversion and an FFMA per code and row of x) and on an H100 is
bound by instruction issue, not DRAM (ncu: SM 60 %, DRAM 51 %). Here the multiply-adds go to `mma.sync`
m16n8k16 (bfloat16 in, float32 accumulation): a warp owns 16 weight rows, x's rows are the MMA's 8 columns
(1-8 rows of x, the rest zero), and a lane only turns its 4 codes a row and 16-code block into bfloat16 pairs:
ORed into the mantissa of 128.0 (0x4300), code c reads as 128 + c exactly, and the 128 is taken out with the
bias, s·Σ(128 + c)x + (b - 128 s)·Σx, where Σx of each block comes from a second MMA with an all-ones A.
Each MMA reads one 16-code block of each row, so it stays inside one quantization group (32, 64 or 128
codes) and every group's sums take its own scale and bias in float32. The 4 lanes of a row read the same 8
bytes (L1 serves the repeats). Simdgroups of a threadgroup split K by groups and meet in threadgroup memory.

CUDA only, 4-bit, bfloat16 x: a measurement of what tensor cores buy, before a portable body (the Metal
prelude would need an MMA with this fragment layout) is worth writing. Prints and writes, per 31B decode
shape and 1 row: µs per call and % of the copy bandwidth for this kernel, our GEMV and MLX's op, and the
error against the float32 definition.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.kernels import quantized_matmul as qmm
from mlx_gemma4.kernels.kernel import launcher
from mlx_gemma4.kernels.prelude import CUDA_PRELUDE

from .attention import device_name
from .measure import memory_bandwidth
from .quantized_matmul import copies, seconds_per_call

MMA = r"""
// D[16x8] += A[16x16] B[16x8]: A row-major bfloat16 pairs, B column-major, float32 accumulators. Lane l holds
// A rows l/4 and l/4 + 8 at k 2(l%4) + {0, 1} and + 8; B column l/4 at the same k; D rows l/4, l/4 + 8 at
// columns 2(l%4) + {0, 1}.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint (&a)[4], const uint (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
"""

BODY = r"""
    // Template: T (bfloat16), GS, M (rows of x, at most 8), NSG (simdgroups splitting K), TILES (16-row tiles
    // a simdgroup owns: x's loads and packing are shared by them).
    constexpr int BLOCKS = GS / 16;  // 16-code MMA blocks a group
    threadgroup float partial[NSG * 32 * 4 * TILES];
    const uint lane = threadIdx.x % 32u;
    const uint sg = threadIdx.x / 32u;
    const int g = lane / 4;
    const int t = lane % 4;
    const int words = w_shape[1];
    const int K = words * 8;
    const int N = w_shape[0];
    const int groups = K / GS;
    const int tile = blockIdx.x * 16 * TILES;
    int r[TILES][2];
    for (int i = 0; i < TILES; i++) {
        r[i][0] = min(tile + 16 * i + g, N - 1);  // rows past N re-read the last one, never written
        r[i][1] = min(tile + 16 * i + g + 8, N - 1);
    }
    const bool has_x = g < M;
    const unsigned short* xp = reinterpret_cast<const unsigned short*>(x) + size_t(has_x ? g : 0) * K;
    const uint shift = 4u * t;
    const uint ones[4] = {0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u};
    const int per = (groups + NSG - 1) / NSG;
    const int first = sg * per;
    const int last = min(groups, first + per);

    float acc[TILES][4];
    for (int i = 0; i < TILES; i++) {
        for (int c = 0; c < 4; c++) {
            acc[i][c] = 0.0f;
        }
    }
    for (int grp = first; grp < last; grp++) {
        uint2 wq[BLOCKS][TILES][2];
#pragma unroll
        for (int bb = 0; bb < BLOCKS; bb++) {
            for (int i = 0; i < TILES; i++) {
                for (int h = 0; h < 2; h++) {
                    wq[bb][i][h] = *reinterpret_cast<const uint2*>(w + size_t(r[i][h]) * words + 2 * (grp * BLOCKS + bb));
                }
            }
        }
        float d[TILES][4];
        for (int i = 0; i < TILES; i++) {
            for (int c = 0; c < 4; c++) {
                d[i][c] = 0.0f;
            }
        }
        float xs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int bb = 0; bb < BLOCKS; bb++) {
            uint bx[2] = {0u, 0u};
            if (has_x) {
                const unsigned short* p = xp + 16 * (grp * BLOCKS + bb);
                bx[0] = uint(p[t]) | (uint(p[t + 4]) << 16);
                bx[1] = uint(p[8 + t]) | (uint(p[12 + t]) << 16);
            }
            mma_bf16(xs, ones, bx);
            for (int i = 0; i < TILES; i++) {
                const uint2 wa = wq[bb][i][0];
                const uint2 wb = wq[bb][i][1];
                const uint a[4] = {and_or(wa.x >> shift, 0x000F000Fu, 0x43004300u), and_or(wb.x >> shift, 0x000F000Fu, 0x43004300u),
                                   and_or(wa.y >> shift, 0x000F000Fu, 0x43004300u), and_or(wb.y >> shift, 0x000F000Fu, 0x43004300u)};
                mma_bf16(d[i], a, bx);
            }
        }
        for (int i = 0; i < TILES; i++) {
            const float s0 = static_cast<float>(scales[size_t(r[i][0]) * groups + grp]);
            const float s1 = static_cast<float>(scales[size_t(r[i][1]) * groups + grp]);
            const float b0 = static_cast<float>(biases[size_t(r[i][0]) * groups + grp]) - 128.0f * s0;
            const float b1 = static_cast<float>(biases[size_t(r[i][1]) * groups + grp]) - 128.0f * s1;
            acc[i][0] += s0 * d[i][0] + b0 * xs[0];
            acc[i][1] += s0 * d[i][1] + b0 * xs[1];
            acc[i][2] += s1 * d[i][2] + b1 * xs[2];
            acc[i][3] += s1 * d[i][3] + b1 * xs[3];
        }
    }
    for (int i = 0; i < TILES; i++) {
        for (int c = 0; c < 4; c++) {
            partial[((sg * TILES + i) * 32 + lane) * 4 + c] = acc[i][c];
        }
    }
    __syncthreads();
    if (sg == 0) {
        for (int i = 0; i < TILES; i++) {
            for (int c = 0; c < 4; c++) {
                float total = 0.0f;
                for (int s = 0; s < NSG; s++) {
                    total += partial[((s * TILES + i) * 32 + lane) * 4 + c];
                }
                const int col = 2 * t + (c & 1);
                const int row = tile + 16 * i + g + (c < 2 ? 0 : 8);
                if (col < M && row < N) {
                    y[size_t(col) * N + row] = static_cast<T>(total);
                }
            }
        }
    }
"""

_kernel = None


def tc_gemv(x, w, scales, biases, group_size: int, split: int, tiles: int) -> mx.array:
    """x [rows <= 8, K] bfloat16 @ dequantize(w).T for a 4-bit weight, on tensor cores."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="tc_gemv_spike", input_names=["x", "w", "scales", "biases"],
                                      output_names=["y"], source=BODY, header=CUDA_PRELUDE + MMA)
    rows, n = x.shape[0], w.shape[0]
    return _kernel(inputs=[x, w, scales, biases],
                   template=[("T", x.dtype), ("GS", group_size), ("M", rows), ("NSG", split), ("TILES", tiles)],
                   grid=(32 * split * -(-n // (16 * tiles)), 1, 1), threadgroup=(32 * split, 1, 1),
                   output_shapes=[(rows, n)], output_dtypes=[x.dtype])[0]


SHAPES = {"k_proj": (5376, 2048), "k/v_proj": (5376, 4096), "q_proj": (5376, 8192), "q_proj global": (5376, 16384),
          "o_proj": (8192, 5376), "o_proj global": (16384, 5376), "gate/up": (5376, 21504), "down": (21504, 5376),
          "lm_head": (5376, 262144)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    parser.add_argument("--launches", nargs="+", default=["2x2", "2x4", "4x2", "4x4", "8x1", "8x2"],
                        help="TILESxNSG: 16-row tiles a simdgroup, simdgroups a threadgroup")
    parser.add_argument("--rows", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    launches = [tuple(map(int, launch.split("x"))) for launch in args.launches]
    copy = memory_bandwidth(2 * 2**30)["copy"]
    print(f"copy bandwidth {copy:.0f} GB/s", flush=True)
    results = []
    for name, (k, n) in SHAPES.items():
        weights = copies(k, n, 4, 64, mx.bfloat16)
        nbytes = sum(a.nbytes for a in weights[0])
        for rows in args.rows:
            x = mx.random.normal((rows, k)).astype(mx.bfloat16)
            case = qmm.quantized_case(rows, k, n, mx.bfloat16, 64, 4)
            want = qmm.reference(*case, 64, 4)
            row = dict(shape=name, k=k, n=n, rows=rows, mb=round(nbytes / 1e6, 1), tc={})
            for tiles, split in launches:
                err = qmm.error(tc_gemv(case[0], *case[1:], 64, split, tiles), want)
                us = 1e6 * seconds_per_call(lambda x, *w: tc_gemv(x, *w, 64, split, tiles), x, weights)
                row["tc"][f"{tiles}x{split}"] = dict(us=us, error=err)
            best = min(row["tc"], key=lambda launch: row["tc"][launch]["us"])
            row.update(tc_best=best, tc_us=row["tc"][best]["us"], tc_error=max(v["error"] for v in row["tc"].values()),
                       ours_us=1e6 * seconds_per_call(lambda x, *w: qmm.gemv(launcher("cuda"), x, *w, 64, 4), x, weights),
                       mlx_us=1e6 * seconds_per_call(lambda x, *w: qmm.mlx_matmul(x, *w, 64, 4), x, weights))
            for key in ("tc", "ours", "mlx"):
                row[f"{key}_of_copy"] = nbytes / (row[f"{key}_us"] * 1e-6) / 1e9 / copy
            print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items() if key != "tc"}),
                  flush=True)
            results.append(row)
        del weights
    args.out.write_text(json.dumps({"device": device_name(), "mlx": mx.__version__, "copy_gbs": copy,
                                    "rows": results}, indent=1))


if __name__ == "__main__":
    main()
