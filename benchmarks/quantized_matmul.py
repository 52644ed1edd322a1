"""Quantized matmuls at the real Gemma 4 shapes on the GPU: ours and the dispatched path against MLX's op.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.quantized_matmul --out benchmarks/results

1. The device's copy bandwidth (read + write counted), the yardstick.
2. Decode, 1-8 rows: our GEMV kernel, MLX's op and `auto` (kernels.quantized_matmul, what the model
   calls: the dispatch rule's path, with its Python cost), for every distinct (K, N) of the dense
   linear layers of each model (attention projections, MLP, PLE projections, the tied head; read from
   the presets' own modules). Effective bandwidth counts the packed weights, scales and biases read
   once. Each timing evaluates a batch of calls on distinct weight copies (>= 256 MB together, so
   nothing is served from the 50 MB L2), divided by the calls: the cost a decode step pays per layer.
3. The GEMV's split of K (simdgroups per threadgroup) swept at 1 row on the 31B shapes, against the
   `simdgroups` rule's choice.
4. The crossover: 16-2048 rows on three shapes, dequantize + matmul, MLX's op and `auto`, batched like
   the decode timings, to check `DISPATCH`'s row thresholds.
5. Prefill, 2048 rows: dequantize-then-matmul vs MLX's op, in TFLOP/s.
6. The MLP's fused gate/up GEMV with GeGLU (one launch) against MLX's way (two quantized matmuls and
   the compiled GeGLU) and our two GEMVs plus the GeGLU, at each model's gate/up shape, 1-8 rows.
`--sections` picks some of decode, split, crossover, prefill, fused (default: all).
Writes quantized_matmul.json and quantized_matmul.md; each result row is printed as it comes, and each
section's seconds at its end (the whole run takes about 2 minutes on an H100).
"""

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma4.kernels import KernelFallbackWarning, backend
from mlx_gemma4.kernels.kernel import launcher
from mlx_gemma4.kernels.quantized_matmul import (
    PATH_ENV, SIMDGROUPS, TOLERANCE, dequantized_matmul, error, geglu_plan, geglu_reference, gemv, mlx_matmul, path,
    quantized_case, quantized_matmul, reference, simdgroups,
)
from mlx_gemma4.model.layers import geglu
from mlx_gemma4.model import Model
from mlx_gemma4.presets import preset_config

from .attention import device_name
from .measure import memory_bandwidth

MODELS = ["E2B", "26B-A4B", "31B"]
DECODE_ROWS = [1, 2, 3, 4, 6, 8]
PREFILL_ROWS = 2048
CROSSOVER_ROWS = [16, 64, 128, 256, 512, 1024, 2048]
CROSSOVER_SHAPES = {"31B gate/up": (5376, 21504), "31B k_proj": (5376, 2048), "E2B q_proj": (1536, 2048)}
SPLIT_SHAPES = {"31B k_proj": (5376, 2048), "31B q_proj": (5376, 8192), "31B o_proj": (8192, 5376),
                "31B o_proj global": (16384, 5376), "31B down": (21504, 5376), "31B gate/up": (5376, 21504)}
SECTIONS = ["decode", "split", "crossover", "prefill", "fused"]
COPIES_BYTES = 256 * 2**20
MAX_COPIES = 256
TRIALS = 5
BATCH_SECONDS = 2e-3  # a timed batch of one shape lasts at least this (launch and sync costs amortized)


def model_shapes(name: str) -> dict:
    """(K, N) -> names of the dense linear layers of that shape, and the tied head. Modules are built
    lazily: their random initial weights are never computed."""
    config = preset_config(name)
    shapes = {}
    for path, module in Model(config).named_modules():
        if type(module) is nn.Linear:
            n, k = module.weight.shape
            shapes.setdefault((k, n), set()).add(path.split(".")[-1])
    shapes.setdefault((config.hidden_size, config.vocab_size), set()).add("lm_head")
    return {shape: sorted(names) for shape, names in sorted(shapes.items())}


def packed(k: int, n: int, bits: int, group: int, dtype) -> tuple:
    """Random codes with realistic scales and biases: (w, scales, biases)."""
    w = mx.random.randint(-(2**31), 2**31 - 1, (n, k * bits // 32), dtype=mx.int32).view(mx.uint32)
    scales = mx.full((n, k // group), 0.004, dtype)
    biases = mx.full((n, k // group), -0.03, dtype)
    return w, scales, biases


def seconds_per_call(fn, x, weights: list) -> float:
    mx.eval(fn(x, *weights[0]))  # build and warm up
    times = []
    for _ in range(TRIALS):
        start = time.perf_counter()
        mx.eval([fn(x, *w) for w in weights])
        times.append((time.perf_counter() - start) / len(weights))
    return statistics.median(times)


def copies(k: int, n: int, bits: int, group: int, dtype) -> list:
    """Distinct weight copies of >= COPIES_BYTES together (at most MAX_COPIES)."""
    weight = packed(k, n, bits, group, dtype)
    count = min(MAX_COPIES, -(-COPIES_BYTES // sum(a.nbytes for a in weight)))
    weights = [weight] + [packed(k, n, bits, group, dtype) for _ in range(count - 1)]
    mx.eval(weights)
    return weights


def measure_decode(model: str, names: list, k: int, n: int, bits: int, group: int, dtype, copy_gbs: float) -> list:
    check = quantized_case(1, k, n, dtype, group, bits)
    gap = error(gemv(launcher(backend()), *check, group, bits), reference(*check, group, bits))
    weights = copies(k, n, bits, group, dtype)
    nbytes = sum(a.nbytes for a in weights[0])
    paths = {
        "ours": lambda x, *w: gemv(launcher(backend()), x, *w, group, bits),
        "mlx": lambda x, *w: mlx_matmul(x, *w, group, bits),
        "auto": lambda x, *w: quantized_matmul(x, *w, group, bits),
    }
    rows = []
    for count in DECODE_ROWS:
        x = mx.random.normal((count, k)).astype(dtype)
        t = {name: seconds_per_call(fn, x, weights) for name, fn in paths.items()}
        rows.append(dict(
            model=model, layers=names, K=k, N=n, rows=count, weight_mb=round(nbytes / 1e6, 2),
            split=simdgroups(k, n, bits), ours_us=round(t["ours"] * 1e6, 2), mlx_us=round(t["mlx"] * 1e6, 2),
            auto_path=path(x, *weights[0], group, bits), auto_us=round(t["auto"] * 1e6, 2),
            speedup=round(t["mlx"] / t["ours"], 2), auto_speedup=round(t["mlx"] / t["auto"], 2),
            ours_gb_per_s=round(nbytes / t["ours"] / 1e9, 1), mlx_gb_per_s=round(nbytes / t["mlx"] / 1e9, 1),
            ours_of_copy=round(nbytes / t["ours"] / 1e9 / copy_gbs, 3), rel_error=gap,
            error_ok=gap <= TOLERANCE[dtype],
        ))
    del weights
    mx.clear_cache()
    return rows


def measure_split(shape: str, k: int, n: int, bits: int, group: int, dtype, copy_gbs: float) -> dict:
    weights = copies(k, n, bits, group, dtype)
    nbytes = sum(a.nbytes for a in weights[0])
    x = mx.random.normal((1, k)).astype(dtype)
    us = {}
    for split in SIMDGROUPS:
        t = seconds_per_call(lambda x, *w: gemv(launcher(backend()), x, *w, group, bits, split), x, weights)
        us[split] = round(t * 1e6, 2)
    del weights
    mx.clear_cache()
    best = min(us, key=us.get)
    return dict(shape=shape, K=k, N=n, us=us, rule=simdgroups(k, n, bits), best=best,
                best_of_copy=round(nbytes / (us[best] * 1e-6) / 1e9 / copy_gbs, 3))


def batched_us(fn, x, weight, seconds_each: float) -> float:
    """µs per call of `fn` in batches that last about BATCH_SECONDS (calls on the same weight)."""
    calls = max(1, min(64, round(BATCH_SECONDS / seconds_each)))
    return round(seconds_per_call(fn, x, [weight] * calls) * 1e6, 1)


def measure_crossover(shape: str, k: int, n: int, bits: int, group: int, dtype) -> list:
    weight = packed(k, n, bits, group, dtype)
    paths = {
        "dequantize": lambda x, *w: dequantized_matmul(x, *w, group, bits),
        "mlx": lambda x, *w: mlx_matmul(x, *w, group, bits),
        "auto": lambda x, *w: quantized_matmul(x, *w, group, bits),
    }
    rows = []
    for count in CROSSOVER_ROWS:
        x = mx.random.normal((count, k)).astype(dtype)
        us = {}
        for name, fn in paths.items():
            guess = seconds_per_call(fn, x, [weight])  # one call per evaluation: an upper bound
            us[name] = batched_us(fn, x, weight, guess)
        fastest = min(("dequantize", "mlx"), key=us.get)
        rows.append(dict(shape=shape, K=k, N=n, rows=count, us=us, fastest=fastest,
                         auto_path=path(x, *weight, group, bits)))
    mx.clear_cache()
    return rows


def tflops(fn, x, weight, k: int, n: int) -> float:
    seconds = seconds_per_call(fn, x, [weight])
    return 2 * x.shape[0] * k * n / seconds / 1e12


def measure_prefill(model: str, names: list, k: int, n: int, bits: int, group: int, dtype) -> dict:
    weight = packed(k, n, bits, group, dtype)
    x = mx.random.normal((PREFILL_ROWS, k)).astype(dtype)
    ours = tflops(lambda x, *w: dequantized_matmul(x, *w, group, bits), x, weight, k, n)
    mlx = tflops(lambda x, *w: mlx_matmul(x, *w, group, bits), x, weight, k, n)
    mx.clear_cache()
    return dict(model=model, layers=names, K=k, N=n, rows=PREFILL_ROWS, ours_tflops=round(ours, 1),
                mlx_tflops=round(mlx, 1), speedup=round(ours / mlx, 2))


def measure_fused(model: str, k: int, n: int, bits: int, group: int, dtype) -> list:
    """µs per MLP input (gelu_tanh(x @ gate.T) * (x @ up.T)): fused GEMV, MLX's ops, our two GEMVs."""
    on = backend()
    pairs = [w + u for w, u in zip(copies(k, n, bits, group, dtype), copies(k, n, bits, group, dtype))]
    check = quantized_case(1, k, n, dtype, group, bits)
    up = quantized_case(1, k, n, dtype, group, bits, seed=1)[1:]
    fused = geglu_plan("gemv", on, check[0], *check[1:], group, bits)
    gap = error(fused(*check, *up), geglu_reference(check[0], check[1:], up, group, bits))
    rows = []
    for count in DECODE_ROWS:
        x = mx.random.normal((count, k)).astype(dtype)
        fused = geglu_plan("gemv", on, x, *pairs[0][:3], group, bits)
        paths = {
            "fused": fused,
            "mlx": lambda x, *w: geglu(mlx_matmul(x, *w[:3], group, bits), mlx_matmul(x, *w[3:], group, bits)),
            "two_gemvs": lambda x, *w: geglu(gemv(launcher(on), x, *w[:3], group, bits),
                                              gemv(launcher(on), x, *w[3:], group, bits)),
        }
        us = {name: round(seconds_per_call(fn, x, pairs) * 1e6, 2) for name, fn in paths.items()}
        rows.append(dict(model=model, K=k, N=n, rows=count, us=us, speedup=round(us["mlx"] / us["fused"], 2),
                         rel_error=gap, error_ok=gap <= TOLERANCE[dtype]))
    del pairs
    mx.clear_cache()
    return rows


def markdown(result: dict) -> str:
    copy = result["bandwidth"]["copy"]
    lines = [
        f"# Quantized matmul: ours vs mx.quantized_matmul ({result['device']}, mlx {result['mlx']})",
        "",
        f"{result['bits']}-bit affine, group {result['group_size']}, {result['dtype']} activations. "
        f"Copy bandwidth {copy:.0f} GB/s (read + write), read {result['bandwidth']['read']:.0f} GB/s. "
        f"Seconds per section: {result['seconds']}.",
        "",
        "## Decode: µs per call; ours = the GEMV kernel, auto = the dispatched path (what the model calls)",
        "",
        "| model | layers | K | N | MB | rows | split | ours µs | MLX µs | ours speedup | auto path | auto µs | "
        "auto speedup | ours GB/s | MLX GB/s | ours / copy BW | error ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["decode"]:
        lines.append(
            f"| {r['model']} | {', '.join(r['layers'])} | {r['K']} | {r['N']} | {r['weight_mb']} | {r['rows']} | "
            f"{r['split']} | {r['ours_us']} | {r['mlx_us']} | {r['speedup']}× | {r['auto_path']} | {r['auto_us']} | "
            f"{r['auto_speedup']}× | {r['ours_gb_per_s']} | {r['mlx_gb_per_s']} | {100 * r['ours_of_copy']:.0f} % | "
            f"{'yes' if r['error_ok'] else 'NO'} |"
        )
    lines += ["", "## GEMV split of K at 1 row: µs per call by simdgroups per threadgroup", "",
              f"| shape | K | N | {' | '.join(map(str, SIMDGROUPS))} | rule | best | best / copy BW |",
              "|---|---:|---:|" + "---:|" * len(SIMDGROUPS) + "---:|---:|---:|"]
    for r in result["split"]:
        lines.append(f"| {r['shape']} | {r['K']} | {r['N']} | {' | '.join(str(r['us'][s]) for s in SIMDGROUPS)} | "
                     f"{r['rule']} | {r['best']} | {100 * r['best_of_copy']:.0f} % |")
    lines += ["", "## Crossover: µs per call by path (batched)", "",
              "| shape | rows | dequantize | mlx | fastest | auto path | auto |", "|---|---:|---:|---:|---|---|---:|"]
    for r in result["crossover"]:
        us = r["us"]
        lines.append(f"| {r['shape']} | {r['rows']} | {us['dequantize']} | {us['mlx']} | {r['fastest']} | "
                     f"{r['auto_path']} | {us['auto']} |")
    lines += [
        "", f"## Prefill, {PREFILL_ROWS} rows: dequantize + dense matmul (ours) vs MLX's op, TFLOP/s", "",
        "| model | layers | K | N | ours | MLX | speedup |", "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["prefill"]:
        lines.append(f"| {r['model']} | {', '.join(r['layers'])} | {r['K']} | {r['N']} | {r['ours_tflops']} | "
                     f"{r['mlx_tflops']} | {r['speedup']}× |")
    lines += ["", "## Fused gate/up GEMV with GeGLU: µs per MLP input", "",
              "| model | K | N | rows | fused | MLX (2 qmm + geglu) | two GEMVs + geglu | fused speedup | error ok |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["fused"]:
        us = r["us"]
        lines.append(f"| {r['model']} | {r['K']} | {r['N']} | {r['rows']} | {us['fused']} | {us['mlx']} | "
                     f"{us['two_gemvs']} | {r['speedup']}× | {'yes' if r['error_ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--bandwidth-bytes", type=int, default=2 * 2**30)
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    args = parser.parse_args()
    if backend() == "reference":
        raise SystemExit("no GPU kernel backend here (MLX_GEMMA4_KERNELS=cuda or metal on a GPU)")
    os.environ.pop(PATH_ENV, None)  # `auto` is the dispatch rule's choice
    warnings.simplefilter("error", KernelFallbackWarning)
    dtype = getattr(mx, args.dtype)
    bits, group = args.bits, args.group_size
    result = dict(device=device_name(), mlx=mx.__version__, backend=backend(), bits=bits, group_size=group,
                  dtype=args.dtype, bandwidth=memory_bandwidth(args.bandwidth_bytes), seconds={}, decode=[], split=[],
                  crossover=[], prefill=[], fused=[])
    print(json.dumps(result["bandwidth"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    copy = result["bandwidth"]["copy"]

    def save(rows: list, key: str):
        for row in rows:
            print(json.dumps(row), flush=True)
        result[key] += rows
        (args.out / "quantized_matmul.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "quantized_matmul.md").write_text(markdown(result))

    def section(key: str, start: float):
        result["seconds"][key] = round(time.perf_counter() - start, 1)
        print(f"{key}: {result['seconds'][key]} s", flush=True)

    shapes = {name: model_shapes(name) for name in args.models}
    wanted = set(args.sections)
    if "decode" in wanted:
        start = time.perf_counter()
        for name, by_shape in shapes.items():
            for (k, n), layers in by_shape.items():
                save(measure_decode(name, layers, k, n, bits, group, dtype, copy), "decode")
        section("decode", start)
    if "split" in wanted:
        start = time.perf_counter()
        for shape, (k, n) in SPLIT_SHAPES.items():
            save([measure_split(shape, k, n, bits, group, dtype, copy)], "split")
        section("split", start)
    if "crossover" in wanted:
        start = time.perf_counter()
        for shape, (k, n) in CROSSOVER_SHAPES.items():
            save(measure_crossover(shape, k, n, bits, group, dtype), "crossover")
        section("crossover", start)
    if "prefill" in wanted:
        start = time.perf_counter()
        for name, by_shape in shapes.items():
            for (k, n), layers in by_shape.items():
                save([measure_prefill(name, layers, k, n, bits, group, dtype)], "prefill")
        section("prefill", start)
    if "fused" in wanted:
        start = time.perf_counter()
        for name, by_shape in shapes.items():
            for (k, n), layers in by_shape.items():
                if "gate_proj" in layers:
                    save(measure_fused(name, k, n, bits, group, dtype), "fused")
        section("fused", start)


if __name__ == "__main__":
    main()
