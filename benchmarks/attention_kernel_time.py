"""Decode attention by the GPU's own time (benchmarks/cupti.py): our two passes against MLX's
`mx.fast.scaled_dot_product_attention`, at the Gemma 4 layer shapes and cache lengths a decode step sees.

    python -m benchmarks.attention_kernel_time --out F.json

Batch 1, bfloat16, one query token, a boolean mask over the slots (as sliding layers pass). Per shape and
length: µs of each kernel (median of REPEATS independent calls) and the effective bandwidth of the keys and
values read. Wall clock (benchmarks/attention.py) times the host's launch at these sizes, not the kernels.
"""

import argparse
import importlib
import json
from pathlib import Path

import mlx.core as mx

from .attention import device_name
from .cupti import median_us, traced

da = importlib.import_module("mlx_gemma4.kernels.decode_attention")  # the package's name is the function
REPEATS = 20
SHAPES = {  # name: (query heads, kv heads, head dim)
    "31B sliding": (32, 16, 256),
    "31B global": (32, 4, 512),
    "E2B sliding": (8, 1, 256),
    "E2B global": (8, 1, 512),
}
LENGTHS = (512, 1055, 4096, 32768)


def inputs(heads: int, kv_heads: int, dim: int, length: int) -> list:
    """REPEATS independent (q, k, v, mask) sets, evaluated."""
    sets = []
    for i in range(REPEATS):
        q, k, v = (mx.random.normal(shape, key=mx.random.key(3 * i + j)).astype(mx.bfloat16)
                   for j, shape in enumerate([(1, heads, 1, dim), (1, kv_heads, length, dim), (1, kv_heads, length, dim)]))
        sets.append((q, k, v, mx.ones((1, 1, 1, length), mx.bool_)))
    mx.eval(sets)
    return sets


def kernel_times(attend, sets) -> dict:
    """{kernel: median µs} of `attend(q, k, v, mask)` over the sets, each evaluated on its own."""
    for q, k, v, mask in sets[:2]:  # compiled and planned before the trace
        mx.eval(attend(q, k, v, mask))

    def run():
        for q, k, v, mask in sets:
            mx.eval(attend(q, k, v, mask))

    return median_us(traced(run)[1])


def row(name: str, length: int) -> dict:
    heads, kv_heads, dim = SHAPES[name]
    sets = inputs(heads, kv_heads, dim, length)
    scale = dim**-0.5
    ours = kernel_times(lambda q, k, v, m: da.decode_attention(q, k, v, scale, m), sets)
    theirs = kernel_times(lambda q, k, v, m: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=m), sets)
    kv_bytes = 2 * kv_heads * length * dim * 2
    total = lambda times: sum(times.values())
    return {"shape": name, "length": length, "kv_mb": kv_bytes / 1e6, "ours_us": ours, "mlx_us": theirs,
            "ours_gb_s": kv_bytes / total(ours) / 1e3, "mlx_gb_s": kv_bytes / total(theirs) / 1e3}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    args = parser.parse_args()
    rows = []
    for name in args.shapes:
        for length in args.lengths:
            rows.append(row(name, length))
            r = rows[-1]
            print(f"{name:12} {length:6} ours {sum(r['ours_us'].values()):7.1f} us {r['ours_gb_s']:6.0f} GB/s   "
                  f"mlx {sum(r['mlx_us'].values()):7.1f} us {r['mlx_gb_s']:6.0f} GB/s   {r['ours_us']}", flush=True)
            args.out.write_text(json.dumps({"device": device_name(), "mlx": mx.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
