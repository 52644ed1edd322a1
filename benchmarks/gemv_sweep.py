"""The quantized GEMV's launch shapes swept at the 31B decode shapes: which (RPS, NSG) streams each weight fastest.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.gemv_sweep --out benchmarks/results/gemv_sweep

RPS: weight rows a threadgroup owns; NSG: simdgroups splitting K in it (kernels/quantized_matmul.py).
Each launch shape is one template instance, compiled once (NVRTC, a few seconds each on CUDA) and then
timed on every weight shape, so the run costs about (shapes swept) x compile time: the defaults, 12
single-GEMV shapes and 4 of the fused gate/up GEMV, take about 1.5 minutes on an H100. For each weight
shape (4-bit, group 64, bf16 x, 1 row unless --rows says otherwise) and launch shape: µs per call (the
median of trials of a batch of calls on distinct weight copies of >= 256 MB, as
benchmarks/quantized_matmul.py times decode), GB/s of the weight read and its fraction of the measured
copy bandwidth, and the relative error against the float32 definition; MLX's op beside it. Then the best
launch shape per weight shape, and the LAUNCH_SHAPES rules that would pick it. Wall clock includes the
host's launch cost (it dominates below ~10 MB) and an evaluation's start and end; LAUNCH_SHAPES now comes
from the GPU's own time (benchmarks/gemv_kernel_time.py), this sweep is the end-to-end view beside it. Writes gemv_sweep.json and
gemv_sweep.md under --out; each result row is printed as it comes.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.kernels import backend
from mlx_gemma4.kernels.kernel import launcher
from mlx_gemma4.kernels.quantized_matmul import (
    ROWS_PER_THREADGROUP, TOLERANCE, error, geglu_reference, gemv, mlx_matmul, reference, simdgroups,
)

from .attention import device_name
from .measure import memory_bandwidth
from .quantized_matmul import TRIALS, copies

# 31B's dense layers at decode: (K, N)
SHAPES = {
    "k_proj": (5376, 2048),
    "k/v_proj": (5376, 4096),
    "q_proj": (5376, 8192),
    "q_proj global": (5376, 16384),
    "o_proj": (8192, 5376),
    "o_proj global": (16384, 5376),
    "gate/up": (5376, 21504),
    "down": (21504, 5376),
}
LM_HEAD = {"lm_head": (5376, 262144)}
FUSED_SHAPE = "gate/up"
# Launch shapes "RPSxNSG": today's defaults (4x1, 4x2, 4x4) among them, and more rows or fewer
# simdgroups per threadgroup, which keep more bytes in flight per simdgroup.
SINGLE = ["2x1", "2x2", "2x4", "4x1", "4x2", "4x4", "4x8", "8x1", "8x2", "8x4", "16x1", "16x2"]
FUSED = ["2x1", "4x1", "8x1", "4x2"]


def launch_shapes(specs: list) -> list:
    """"RPSxNSG" strings -> (rps, nsg) tuples."""
    try:
        return [tuple(int(part) for part in spec.split("x", 1)) for spec in specs]
    except ValueError:
        raise SystemExit(f"launch shapes are RPSxNSG, e.g. 8x1; got {specs}")


def seconds_per_call(fn, x, weights: list) -> float:
    """Median over TRIALS of one evaluation of a batch of calls on distinct weight copies, per call. The
    batch's graph is built before the clock starts: the time is the launches' and the device's, not
    Python's, so that launch shapes compare on what they change."""
    mx.eval(fn(x, *weights[0]))  # build and warm up
    times = []
    for _ in range(TRIALS):
        outputs = [fn(x, *w) for w in weights]
        start = time.perf_counter()
        mx.eval(outputs)
        times.append((time.perf_counter() - start) / len(weights))
    return statistics.median(times)


def shaped(rps: int, nsg: int, group: int, bits: int, fused: bool = False):
    """run(x, *weights) -> the GEMV (fused: gate's then up's weights) at this launch shape."""
    launch = launcher(backend())
    if fused:
        return lambda x, *w: gemv(launch, x, *w[:3], group, bits, nsg, up=w[3:], rps=rps)
    return lambda x, *w: gemv(launch, x, *w, group, bits, nsg, rps=rps)


def sweep_single(name: str, k: int, n: int, rows: int, shapes: list, bits: int, group: int, dtype, copy: float) -> list:
    weights = copies(k, n, bits, group, dtype)
    nbytes = sum(a.nbytes for a in weights[0])
    x = mx.random.normal((rows, k)).astype(dtype)
    want = reference(x, *weights[0], group, bits)
    mlx_us = seconds_per_call(lambda x, *w: mlx_matmul(x, *w, group, bits), x, weights) * 1e6
    results = []
    for rps, nsg in shapes:
        run = shaped(rps, nsg, group, bits)
        gap = error(run(x, *weights[0]), want)
        us = seconds_per_call(run, x, weights) * 1e6
        gbs = nbytes / us / 1e3
        results.append(dict(kind="gemv", shape=name, K=k, N=n, rows=rows, rps=rps, nsg=nsg, us=round(us, 2),
                            gb_per_s=round(gbs, 1), of_copy=round(gbs / copy, 3), mlx_us=round(mlx_us, 2),
                            rel_error=gap, error_ok=gap <= TOLERANCE[dtype]))
        print(json.dumps(results[-1]), flush=True)
    del weights
    mx.clear_cache()
    return results


def sweep_fused(name: str, k: int, n: int, rows: int, shapes: list, bits: int, group: int, dtype, copy: float) -> list:
    pairs = [w + u for w, u in zip(copies(k, n, bits, group, dtype), copies(k, n, bits, group, dtype))]
    nbytes = sum(a.nbytes for a in pairs[0])
    x = mx.random.normal((rows, k)).astype(dtype)
    want = geglu_reference(x, pairs[0][:3], pairs[0][3:], group, bits)
    results = []
    for rps, nsg in shapes:
        run = shaped(rps, nsg, group, bits, fused=True)
        gap = error(run(x, *pairs[0]), want)
        us = seconds_per_call(run, x, pairs) * 1e6
        gbs = nbytes / us / 1e3
        results.append(dict(kind="fused", shape=name, K=k, N=n, rows=rows, rps=rps, nsg=nsg, us=round(us, 2),
                            gb_per_s=round(gbs, 1), of_copy=round(gbs / copy, 3), rel_error=gap,
                            error_ok=gap <= TOLERANCE[dtype]))
        print(json.dumps(results[-1]), flush=True)
    del pairs
    mx.clear_cache()
    return results


def best(result: dict) -> list:
    """Per (kind, weight shape, rows): the fastest launch shape whose error is within tolerance, and
    the default one's (RPS 4, `simdgroups`) for comparison."""
    groups = {}
    for r in result["sweep"]:
        groups.setdefault((r["kind"], r["shape"], r["rows"]), []).append(r)
    rows = []
    for (kind, shape, count), runs in groups.items():
        good = [r for r in runs if r["error_ok"]]
        if not good:
            continue
        fastest = min(good, key=lambda r: r["us"])
        default = (ROWS_PER_THREADGROUP, simdgroups(fastest["K"], fastest["N"], result["bits"]))
        today = next((r for r in runs if (r["rps"], r["nsg"]) == default), None)
        rows.append(dict(kind=kind, shape=shape, K=fastest["K"], N=fastest["N"], rows=count, rps=fastest["rps"],
                         nsg=fastest["nsg"], us=fastest["us"], of_copy=fastest["of_copy"], default=default,
                         default_us=today and today["us"], gain=today and round(today["us"] / fastest["us"], 2)))
    return rows


def rules(bests: list) -> list:
    """LAUNCH_SHAPES rules (most rows, fewest K, most K, fewest N, most N, RPS, NSG) for the single
    GEMV's best shapes, one per weight shape."""
    return [(b["rows"], b["K"], b["K"], b["N"], b["N"], b["rps"], b["nsg"]) for b in bests if b["kind"] == "gemv"]


def markdown(result: dict) -> str:
    copy = result["bandwidth"]["copy"]
    lines = [
        f"# Quantized GEMV launch shapes ({result['device']}, mlx {result['mlx']})", "",
        f"{result['bits']}-bit affine, group {result['group_size']}, {result['dtype']} x. Copy bandwidth {copy:.0f} "
        f"GB/s (read + write). Seconds: {result['seconds']}. RPSxNSG: weight rows x simdgroups per threadgroup.", "",
        "## µs per call (% of copy bandwidth); ✗ = error over tolerance", "",
    ]
    runs = result["sweep"]
    shapes = list(dict.fromkeys((r["rps"], r["nsg"]) for r in runs))
    lines += ["| kind | shape | K | N | rows | MLX µs | " + " | ".join(f"{a}x{b}" for a, b in shapes) + " |",
              "|---|---|---:|---:|---:|---:|" + "---:|" * len(shapes)]
    groups = {}
    for r in runs:
        groups.setdefault((r["kind"], r["shape"], r["K"], r["N"], r["rows"]), {})[r["rps"], r["nsg"]] = r
    for (kind, shape, k, n, count), by_shape in groups.items():
        cells = [f"{r['us']} ({100 * r['of_copy']:.0f} %){'' if r['error_ok'] else ' ✗'}" if (r := by_shape.get(s))
                 else "" for s in shapes]
        mlx = next(iter(by_shape.values())).get("mlx_us", "")
        lines.append(f"| {kind} | {shape} | {k} | {n} | {count} | {mlx} | " + " | ".join(cells) + " |")
    lines += ["", "## Best launch shape per weight shape", "",
              "| kind | shape | K | N | rows | best | µs | % of copy | default | default µs | gain |",
              "|---|---|---:|---:|---:|---|---:|---:|---|---:|---:|"]
    for b in result["best"]:
        lines.append(f"| {b['kind']} | {b['shape']} | {b['K']} | {b['N']} | {b['rows']} | {b['rps']}x{b['nsg']} | "
                     f"{b['us']} | {100 * b['of_copy']:.0f} % | {b['default'][0]}x{b['default'][1]} | "
                     f"{b['default_us'] or 'not swept'} | {b['gain'] or ''} |")
    lines += ["", "LAUNCH_SHAPES rules for the single GEMV (most rows, fewest K, most K, fewest N, most N, RPS, NSG):",
              "", "```", *(f"{rule}," for rule in result["rules"]), "```"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--single", nargs="*", default=SINGLE, help="single-GEMV launch shapes RPSxNSG")
    parser.add_argument("--fused", nargs="*", default=FUSED, help="fused gate/up launch shapes RPSxNSG")
    parser.add_argument("--rows", nargs="+", type=int, default=[1], help="rows of x (each a new compile)")
    parser.add_argument("--lm-head", action="store_true", help="also 31B's lm_head (793 MB)")
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args()
    if backend() == "reference":
        raise SystemExit("no GPU kernel backend here (MLX_GEMMA4_KERNELS=cuda or metal on a GPU)")
    single, fused = launch_shapes(args.single), launch_shapes(args.fused)
    dtype, bits, group = getattr(mx, args.dtype), args.bits, args.group_size
    result = dict(device=device_name(), mlx=mx.__version__, backend=backend(), bits=bits, group_size=group,
                  dtype=args.dtype, bandwidth=memory_bandwidth(2**30), seconds={}, sweep=[], best=[], rules=[])
    print(json.dumps(result["bandwidth"]), flush=True)
    copy = result["bandwidth"]["copy"]
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        result["best"] = best(result)
        result["rules"] = rules(result["best"])
        (args.out / "gemv_sweep.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "gemv_sweep.md").write_text(markdown(result))

    start = time.perf_counter()
    for rows in args.rows:
        for name, (k, n) in {**SHAPES, **(LM_HEAD if args.lm_head else {})}.items():
            result["sweep"] += sweep_single(name, k, n, rows, single, bits, group, dtype, copy)
            save()
    result["seconds"]["single"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    for rows in args.rows:
        result["sweep"] += sweep_fused(FUSED_SHAPE, *SHAPES[FUSED_SHAPE], rows, fused, bits, group, dtype, copy)
    result["seconds"]["fused"] = round(time.perf_counter() - start, 1)
    save()
    for b in result["best"]:
        print(json.dumps(b), flush=True)
    print("LAUNCH_SHAPES rules:", *(f"    {rule}," for rule in result["rules"]), sep="\n", flush=True)


if __name__ == "__main__":
    main()
