"""Decode attention on the GPU: our kernel against MLX's `mx.fast.scaled_dot_product_attention`.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.attention --out benchmarks/results

One query token against a cache of each context length, batch 1, bfloat16, the head layouts of the
Gemma 4 layers with the largest (31B) and the smallest (E2B) caches. Each timing is the median over
trials of a batch of independent calls evaluated together, divided by the calls: the cost a decode
step pays per attention layer. Bandwidth counts the keys and values read. Writes attention.json and
attention.md.
"""

import argparse
import json
import platform
import statistics
import subprocess
import time
import warnings
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.kernels import KernelFallbackWarning, backend, decode_attention

LAYOUTS = {  # head_dim -> layer: (query heads, kv heads)
    256: {"31B sliding": (32, 16), "E2B sliding": (8, 1)},
    512: {"31B global": (32, 4), "E2B global": (8, 1)},
}
CONTEXTS = [512, 1024, 8192, 32768, 131072]
CALLS = 16
TRIALS = 7


def ours(queries, keys, values):
    return decode_attention(queries, keys, values, 1.0)


def mlx(queries, keys, values):
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=1.0)


def seconds_per_call(attention, queries: list, keys, values) -> float:
    mx.eval(attention(queries[0], keys, values))  # build and warm up
    times = []
    for _ in range(TRIALS):
        start = time.perf_counter()
        mx.eval([attention(q, keys, values) for q in queries])
        times.append((time.perf_counter() - start) / len(queries))
    return statistics.median(times)


def measure(dim: int, layer: str, context: int) -> dict:
    heads, kv_heads = LAYOUTS[dim][layer]
    rng = mx.random.split(mx.random.key(context + dim), 2 + CALLS)
    # RMS-normalised q and k as in the model (Gemma 4 attends with scale 1.0)
    keys = mx.random.normal((1, kv_heads, context, dim), key=rng[0]).astype(mx.bfloat16) * dim**-0.25
    values = mx.random.normal((1, kv_heads, context, dim), key=rng[1]).astype(mx.bfloat16)
    queries = [mx.random.normal((1, heads, 1, dim), key=k).astype(mx.bfloat16) * dim**-0.25 for k in rng[2:]]
    mx.eval(keys, values, queries)
    error = mx.abs(ours(queries[0], keys, values) - mlx(queries[0], keys, values)).max().item()
    ours_s, mlx_s = seconds_per_call(ours, queries, keys, values), seconds_per_call(mlx, queries, keys, values)
    read = keys.nbytes + values.nbytes
    return dict(
        head_dim=dim, layer=layer, heads=heads, kv_heads=kv_heads, context=context,
        ours_us=round(ours_s * 1e6, 1), mlx_us=round(mlx_s * 1e6, 1), speedup=round(mlx_s / ours_s, 2),
        ours_gb_per_s=round(read / ours_s / 1e9), mlx_gb_per_s=round(read / mlx_s / 1e9), max_abs_diff=error,
    )


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip() or platform.processor()
    except OSError:
        return platform.processor()


def markdown(result: dict) -> str:
    lines = [
        f"# Decode attention: ours vs mx.fast.scaled_dot_product_attention ({result['device']}, mlx {result['mlx']})",
        "",
        "Batch 1, bfloat16, one query token; µs per call (median of a batch of independent calls); GB/s of keys "
        "and values read.",
        "",
        "| head_dim | layer (q:kv heads) | context | ours µs | MLX µs | speedup | ours GB/s | MLX GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['head_dim']} | {r['layer']} ({r['heads']}:{r['kv_heads']}) | {r['context']} | {r['ours_us']} | "
            f"{r['mlx_us']} | {r['speedup']}× | {r['ours_gb_per_s']} | {r['mlx_gb_per_s']} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    args = parser.parse_args()
    if backend() == "reference":
        raise SystemExit("no GPU kernel backend here (MLX_GEMMA4_KERNELS=cuda or metal on a GPU)")
    warnings.simplefilter("error", KernelFallbackWarning)  # timing the reference would be meaningless
    result = dict(device=device_name(), mlx=mx.__version__, backend=backend(), rows=[])
    args.out.mkdir(parents=True, exist_ok=True)
    for dim in LAYOUTS:
        for layer in LAYOUTS[dim]:
            for context in args.contexts:
                result["rows"].append(measure(dim, layer, context))
                print(json.dumps(result["rows"][-1]), flush=True)
                (args.out / "attention.json").write_text(json.dumps(result, indent=1) + "\n")
                (args.out / "attention.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
