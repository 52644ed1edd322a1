"""Quantized matmuls at the real Gemma 4 shapes on the GPU: ours against MLX's `mx.quantized_matmul`.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.quantized_matmul --out benchmarks/results

1. The device's copy bandwidth (read + write counted), the yardstick.
2. Decode, 1/2/4/8 rows: our GEMV kernel vs MLX's op, for every distinct (K, N) of the dense linear
   layers of each model (attention projections, MLP, PLE projections, the tied head; read from the
   presets' own modules). Effective bandwidth counts the packed weights, scales and biases read once.
   Each timing evaluates a batch of calls on distinct weight copies (>= 512 MB together, so nothing
   is served from L2), divided by the calls: the cost a decode step pays per layer.
3. Prefill, 2048 rows: dequantize-then-matmul (ours) vs MLX's op, in TFLOP/s.
4. The crossover: rows 8-1024 on two shapes, each path, to set `DISPATCH`'s row thresholds.
Writes quantized_matmul.json and quantized_matmul.md; each result row is printed as it comes.
"""

import argparse
import json
import math
import statistics
import time
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma4.kernels import KernelFallbackWarning, backend
from mlx_gemma4.kernels.kernel import launcher
from mlx_gemma4.kernels.quantized_matmul import (
    TOLERANCE, dequantized_matmul, error, gemv, mlx_matmul, quantized_case, reference,
)
from mlx_gemma4.model import Model
from mlx_gemma4.presets import preset_config

from .attention import device_name
from .measure import memory_bandwidth

MODELS = ["E2B", "26B-A4B", "31B"]
DECODE_ROWS = [1, 2, 4, 8]
PREFILL_ROWS = 2048
CROSSOVER_ROWS = [8, 16, 32, 64, 128, 256, 1024]
CROSSOVER_SHAPES = {"31B gate/up": (5376, 21504), "E2B q_proj": (1536, 2048)}
COPIES_BYTES = 512 * 2**20
MAX_COPIES = 512
TRIALS = 7


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


def measure_decode(model: str, names: list, k: int, n: int, bits: int, group: int, dtype, copy_gbs: float) -> list:
    check = quantized_case(1, k, n, dtype, group, bits)
    gap = error(gemv(launcher(backend()), *check, group, bits), reference(*check, group, bits))
    weight = packed(k, n, bits, group, dtype)
    nbytes = sum(a.nbytes for a in weight)
    weights = [weight] + [packed(k, n, bits, group, dtype) for _ in range(min(MAX_COPIES, -(-COPIES_BYTES // nbytes)) - 1)]
    mx.eval(weights)

    def ours(x, w, scales, biases):
        return gemv(launcher(backend()), x, w, scales, biases, group, bits)

    def mlx(x, w, scales, biases):
        return mlx_matmul(x, w, scales, biases, group, bits)

    rows = []
    for count in DECODE_ROWS:
        x = mx.random.normal((count, k)).astype(dtype)
        t_ours, t_mlx = seconds_per_call(ours, x, weights), seconds_per_call(mlx, x, weights)
        rows.append(dict(
            model=model, layers=names, K=k, N=n, rows=count, weight_mb=round(nbytes / 1e6, 2),
            ours_us=round(t_ours * 1e6, 2), mlx_us=round(t_mlx * 1e6, 2), speedup=round(t_mlx / t_ours, 2),
            ours_gb_per_s=round(nbytes / t_ours / 1e9, 1), mlx_gb_per_s=round(nbytes / t_mlx / 1e9, 1),
            ours_of_copy=round(nbytes / t_ours / 1e9 / copy_gbs, 3), rel_error=gap,
            error_ok=gap <= TOLERANCE[dtype],
        ))
    del weights
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


def measure_crossover(shape: str, k: int, n: int, bits: int, group: int, dtype) -> list:
    weight = packed(k, n, bits, group, dtype)
    paths = {
        "gemv": lambda x, *w: gemv(launcher(backend()), x, *w, group, bits),
        "dequantize": lambda x, *w: dequantized_matmul(x, *w, group, bits),
        "mlx": lambda x, *w: mlx_matmul(x, *w, group, bits),
    }
    rows = []
    for count in CROSSOVER_ROWS:
        x = mx.random.normal((count, k)).astype(dtype)
        us = {name: round(seconds_per_call(fn, x, [weight]) * 1e6, 1)
              for name, fn in paths.items() if name != "gemv" or count <= 8}
        rows.append(dict(shape=shape, K=k, N=n, rows=count, us=us, fastest=min(us, key=us.get)))
    return rows


def markdown(result: dict) -> str:
    copy = result["bandwidth"]["copy"]
    lines = [
        f"# Quantized matmul: ours vs mx.quantized_matmul ({result['device']}, mlx {result['mlx']})",
        "",
        f"{result['bits']}-bit affine, group {result['group_size']}, {result['dtype']} activations. "
        f"Copy bandwidth {copy:.0f} GB/s (read + write), read {result['bandwidth']['read']:.0f} GB/s.",
        "",
        "## Decode (GEMV): µs per call, effective GB/s of weights read",
        "",
        "| model | layers | K | N | rows | ours µs | MLX µs | speedup | ours GB/s | MLX GB/s | ours / copy BW | error ok |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["decode"]:
        lines.append(
            f"| {r['model']} | {', '.join(r['layers'])} | {r['K']} | {r['N']} | {r['rows']} | {r['ours_us']} | "
            f"{r['mlx_us']} | {r['speedup']}× | {r['ours_gb_per_s']} | {r['mlx_gb_per_s']} | "
            f"{100 * r['ours_of_copy']:.0f} % | {'yes' if r['error_ok'] else 'NO'} |"
        )
    lines += [
        "", f"## Prefill, {PREFILL_ROWS} rows: dequantize + dense matmul (ours) vs MLX's op, TFLOP/s", "",
        "| model | layers | K | N | ours | MLX | speedup |", "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["prefill"]:
        lines.append(f"| {r['model']} | {', '.join(r['layers'])} | {r['K']} | {r['N']} | {r['ours_tflops']} | "
                     f"{r['mlx_tflops']} | {r['speedup']}× |")
    lines += ["", "## Crossover: µs per call by path", "", "| shape | rows | gemv | dequantize | mlx | fastest |",
              "|---|---:|---:|---:|---:|---|"]
    for r in result["crossover"]:
        us = r["us"]
        lines.append(f"| {r['shape']} | {r['rows']} | {us.get('gemv', '')} | {us['dequantize']} | {us['mlx']} | "
                     f"{r['fastest']} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--bandwidth-bytes", type=int, default=4 * 2**30)
    args = parser.parse_args()
    if backend() == "reference":
        raise SystemExit("no GPU kernel backend here (MLX_GEMMA4_KERNELS=cuda or metal on a GPU)")
    warnings.simplefilter("error", KernelFallbackWarning)
    dtype = getattr(mx, args.dtype)
    bits, group = args.bits, args.group_size
    result = dict(device=device_name(), mlx=mx.__version__, backend=backend(), bits=bits, group_size=group,
                  dtype=args.dtype, bandwidth=memory_bandwidth(args.bandwidth_bytes), decode=[], prefill=[],
                  crossover=[])
    print(json.dumps(result["bandwidth"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)

    def save(rows: list, key: str):
        for row in rows:
            print(json.dumps(row), flush=True)
        result[key] += rows
        (args.out / "quantized_matmul.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "quantized_matmul.md").write_text(markdown(result))

    shapes = {name: model_shapes(name) for name in args.models}
    for name, by_shape in shapes.items():
        for (k, n), layers in by_shape.items():
            save(measure_decode(name, layers, k, n, bits, group, dtype, result["bandwidth"]["copy"]), "decode")
    for name, by_shape in shapes.items():
        for (k, n), layers in by_shape.items():
            save([measure_prefill(name, layers, k, n, bits, group, dtype)], "prefill")
    for shape, (k, n) in CROSSOVER_SHAPES.items():
        save(measure_crossover(shape, k, n, bits, group, dtype), "crossover")


if __name__ == "__main__":
    main()
