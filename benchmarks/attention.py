"""Decode and prefill attention on the GPU: our kernels against MLX's `mx.fast.scaled_dot_product_attention`.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.attention --out benchmarks/results
    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.attention --prefill --out benchmarks/results

One query token against a cache of each context length, batch 1, bfloat16, the head layouts of the
Gemma 4 layers with the largest (31B) and the smallest (E2B) caches. Each timing is the median over
trials of a batch of independent calls evaluated together, divided by the calls: the cost a decode
step pays per attention layer. Bandwidth counts the keys and values read. Writes attention.json and
attention.md, and prints (and writes) where MLX overtakes the kernel per layout: what sets
SINGLE_KV_HEAD_MAX_KEYS in kernels/sdpa.py, the context beyond which a single-kv-head layer goes to MLX.

--prefill: a chunk of 512 or 2048 queries whose keys end at its last query, MLX given the mask the
model passes: "causal" for global layers, the boolean [1, 1, L, S] array for a sliding layer's chunk
after its ring has filled (S = window + 31 + L keys, whatever the context). Writes
attention_prefill.json and attention_prefill.md.
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

from mlx_gemma4.kernels import CausalMask, KernelFallbackWarning, backend, decode_attention, prefill_attention

LAYOUTS = {  # head_dim -> layer: (query heads, kv heads)
    256: {"31B sliding": (32, 16), "E2B sliding": (8, 1)},
    512: {"31B global": (32, 4), "E2B global": (8, 1)},
}
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
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


PREFILL_LAYERS = {  # layer: (head_dim, query heads, kv heads, window)
    "31B global": (512, 32, 4, None),
    "E2B global": (512, 8, 1, None),
    "31B sliding": (256, 32, 16, 1024),
    "E2B sliding": (256, 8, 1, 512),
}
CHUNKS = [512, 2048]
PREFILL_CONTEXTS = [1024, 8192, 32768, 131072]
MAX_SCORES = 2**33  # bytes of float32 scores MLX's unfused path may materialise; beyond, the row is skipped


def measure_prefill(layer: str, length: int, context: int) -> dict:
    dim, heads, kv_heads, window = PREFILL_LAYERS[layer]
    n_keys = context if window is None else window + 31 + length
    rng = mx.random.split(mx.random.key(context + length + dim), 3)
    keys = mx.random.normal((1, kv_heads, n_keys, dim), key=rng[0]).astype(mx.bfloat16) * dim**-0.25
    values = mx.random.normal((1, kv_heads, n_keys, dim), key=rng[1]).astype(mx.bfloat16)
    queries = mx.random.normal((1, heads, length, dim), key=rng[2]).astype(mx.bfloat16) * dim**-0.25
    rules = CausalMask(window)
    model_mask = "causal" if window is None else rules.dense(length, n_keys)
    mx.eval(keys, values, queries, model_mask)

    def ours(q, k, v):
        return prefill_attention(q, k, v, 1.0, rules)

    def mlx(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=model_mask)

    error = mx.abs(ours(queries, keys, values) - mlx(queries, keys, values)).max().item()
    ours_s, mlx_s = seconds_per_call(ours, [queries], keys, values), seconds_per_call(mlx, [queries], keys, values)
    return dict(
        head_dim=dim, layer=layer, heads=heads, kv_heads=kv_heads, window=window, chunk=length, keys=n_keys,
        ours_ms=round(ours_s * 1e3, 2), mlx_ms=round(mlx_s * 1e3, 2), speedup=round(mlx_s / ours_s, 2),
        max_abs_diff=error,
    )


def prefill_rows():
    for layer, (dim, heads, _, window) in PREFILL_LAYERS.items():
        for length in CHUNKS:
            for context in [PREFILL_CONTEXTS[-1]] if window else PREFILL_CONTEXTS:
                n_keys = context if window is None else window + 31 + length
                if context >= length and 4 * heads * length * n_keys <= MAX_SCORES:
                    yield layer, length, context


def prefill_markdown(result: dict) -> str:
    lines = [
        f"# Prefill attention: ours vs mx.fast.scaled_dot_product_attention ({result['device']}, mlx {result['mlx']})",
        "",
        "Batch 1, bfloat16, one chunk of queries whose keys end at its last query; ms per call (median); MLX gets "
        "the mask the model passes (\"causal\", or the boolean array of a sliding layer's chunk).",
        "",
        "| head_dim | layer (q:kv heads) | window | chunk | keys | ours ms | MLX ms | speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['head_dim']} | {r['layer']} ({r['heads']}:{r['kv_heads']}) | {r['window'] or '-'} | {r['chunk']} | "
            f"{r['keys']} | {r['ours_ms']} | {r['mlx_ms']} | {r['speedup']}× |"
        )
    return "\n".join(lines) + "\n"


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
    return "\n".join(lines + ["", *crossovers(result["rows"])]) + "\n"


def crossovers(rows: list) -> list:
    """Per layout, the contexts where MLX is faster; then what that makes of SINGLE_KV_HEAD_MAX_KEYS."""
    lines, single_kv_limits = [], []
    for dim, layer in dict.fromkeys((r["head_dim"], r["layer"]) for r in rows):
        mine = sorted((r for r in rows if (r["head_dim"], r["layer"]) == (dim, layer)), key=lambda r: r["context"])
        lost = [r["context"] for r in mine if r["speedup"] < 1]
        # the longest context up to which ours wins at every measured length
        won_up_to = max((r["context"] for r in mine if not lost or r["context"] < lost[0]), default=0)
        verdict = f"MLX faster at {lost} keys; ours up to {won_up_to}" if lost else "ours faster at every context"
        lines.append(f"- d={dim} {layer} ({mine[0]['heads']}:{mine[0]['kv_heads']}): {verdict}")
        if mine[0]["kv_heads"] == 1:
            single_kv_limits.append(won_up_to if lost else None)
    if single_kv_limits:
        limits = [x for x in single_kv_limits if x is not None]
        lines.append(
            f"- SINGLE_KV_HEAD_MAX_KEYS: {min(limits)} (the shortest single-kv-head win streak)" if limits
            else "- SINGLE_KV_HEAD_MAX_KEYS: none needed, ours is faster for every single-kv-head layout and context"
        )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    parser.add_argument("--prefill", action="store_true", help="prefill chunks instead of decode steps")
    args = parser.parse_args()
    if backend() == "reference":
        raise SystemExit("no GPU kernel backend here (MLX_GEMMA4_KERNELS=cuda or metal on a GPU)")
    warnings.simplefilter("error", KernelFallbackWarning)  # timing the reference would be meaningless
    result = dict(device=device_name(), mlx=mx.__version__, backend=backend(), rows=[])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.prefill:
        for row in prefill_rows():
            result["rows"].append(measure_prefill(*row))
            print(json.dumps(result["rows"][-1]), flush=True)
            (args.out / "attention_prefill.json").write_text(json.dumps(result, indent=1) + "\n")
            (args.out / "attention_prefill.md").write_text(prefill_markdown(result))
        return
    for dim in LAYOUTS:
        for layer in LAYOUTS[dim]:
            for context in args.contexts:
                result["rows"].append(measure(dim, layer, context))
                print(json.dumps(result["rows"][-1]), flush=True)
                (args.out / "attention.json").write_text(json.dumps(result, indent=1) + "\n")
                (args.out / "attention.md").write_text(markdown(result))
    print("\n".join(crossovers(result["rows"])))


if __name__ == "__main__":
    main()
