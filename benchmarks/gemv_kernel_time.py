"""The GEMVs' time on the GPU alone, from Nsight Compute: effective bandwidth without the host's launch cost.

    ncu --csv --metrics gpu__time_duration.sum --clock-control none -k regex:quantized_gemv \
        python -m benchmarks.gemv_kernel_time run --plan P.json > K.csv
    python -m benchmarks.gemv_kernel_time report --plan P.json --ncu K.csv --out benchmarks/results/gemv_kernel_time

Timed by wall clock (benchmarks/gemv_sweep.py, gemv_mma.py), a GEMV of a few MB is bound by the host, which
encodes a custom kernel's launch in 3-6 µs (launch_cost.md), and a batch of a few calls of a larger one
carries the evaluation's start and end. Here ncu times each kernel on the device (caches flushed before
each, as a decode step finds the weights: out of L2; clocks left to the GPU). `run` calls the float GEMV
(at the model's launch) and the matrix-unit GEMV (its default launch) REPEATS times on every decode shape
of benchmarks/gemv_mma.py, 1 row, 4-bit g64 bf16, in a fixed order that `report` pairs with ncu's rows;
it also measures the copy bandwidth (wall clock over 1 GB, where launch cost vanishes). Writes
gemv_kernel_time.json and .md under --out.
"""

import argparse
import csv
import json
import statistics
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.kernels import quantized_gemv_mma as mma
from mlx_gemma4.kernels import quantized_matmul as qmm
from mlx_gemma4.kernels.kernel import launcher

from .attention import device_name
from .gemv_mma import SHAPES
from .measure import memory_bandwidth
from .quantized_matmul import packed

REPEATS = 3
KERNELS = {"float GEMV": qmm.gemv, "MMA GEMV": mma.gemv}


def run(plan: Path):
    calls = []
    cuda = launcher("cuda")
    for model, shapes in SHAPES.items():
        for shape, (k, n) in shapes.items():
            for fused in (False, True) if shape == "gate/up" else (False,):
                weights = packed(k, n, 4, 64, mx.bfloat16) + (packed(k, n, 4, 64, mx.bfloat16) if fused else ())
                x = mx.random.normal((1, k)).astype(mx.bfloat16)
                mx.eval(x, weights)
                nbytes = sum(a.nbytes for a in weights)
                for name, gemv in KERNELS.items():
                    extra = dict(bits=4) if gemv is qmm.gemv else {}
                    up = dict(up=weights[3:]) if fused else {}
                    for _ in range(REPEATS):
                        mx.eval(gemv(cuda, x, *weights[:3], 64, **extra, **up))
                        calls.append(dict(model=model, shape=shape, fused=fused, K=k, N=n, bytes=nbytes, kernel=name))
                del weights
                mx.clear_cache()
    plan.write_text(json.dumps(dict(device=device_name(), mlx=mx.__version__, copy_gbs=memory_bandwidth(2**30)["copy"],
                                    calls=calls), indent=1))


def report(plan: Path, ncu: Path, out: Path):
    planned = json.loads(plan.read_text())
    lines = [line for line in ncu.read_text().splitlines() if line.startswith('"')]
    rows = [r for r in csv.DictReader(lines) if r["Metric Name"] == "gpu__time_duration.sum"]
    if len(rows) != len(planned["calls"]):
        raise SystemExit(f"ncu timed {len(rows)} kernels, the plan made {len(planned['calls'])}")
    scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
    times = {}
    for call, row in zip(planned["calls"], rows):
        key = (call["model"], call["shape"], call["fused"], call["K"], call["N"], call["bytes"])
        times.setdefault(key, {}).setdefault(call["kernel"], []).append(
            float(row["Metric Value"].replace(",", "")) * scale[row["Metric Unit"]])
    copy = planned["copy_gbs"]
    results = []
    for (model, shape, fused, k, n, nbytes), by_kernel in times.items():
        result = dict(model=model, shape=shape, fused=fused, K=k, N=n, mb=round(nbytes / 1e6, 1))
        for name, us in by_kernel.items():
            median = statistics.median(us)
            result[name] = dict(us=round(median, 2), of_copy=round(nbytes / median / 1e3 / copy, 3))
        results.append(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_kernel_time.json").write_text(json.dumps(dict(device=planned["device"], mlx=planned["mlx"],
                                                               copy_gbs=copy, rows=results), indent=1) + "\n")
    table = [f"# GEMV time on the GPU, from Nsight Compute ({planned['device']}, mlx {planned['mlx']})", "",
             f"1 row, 4-bit, group 64, bf16 x; median of {REPEATS} kernels each, caches flushed before each; copy "
             f"bandwidth {copy:.0f} GB/s (wall clock, 1 GB). µs (% of copy bandwidth).", "",
             "| model | shape | fused | K | N | MB | " + " | ".join(KERNELS) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(KERNELS)]
    for r in results:
        cells = [f"{r[name]['us']} ({100 * r[name]['of_copy']:.0f} %)" for name in KERNELS]
        table.append(f"| {r['model']} | {r['shape']} | {'yes' if r['fused'] else ''} | {r['K']} | {r['N']} | {r['mb']} | "
                     + " | ".join(cells) + " |")
    (out / "gemv_kernel_time.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("run", "report"))
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--ncu", type=Path, help="ncu's CSV (report)")
    parser.add_argument("--out", type=Path, help="folder for the results (report)")
    args = parser.parse_args()
    if args.mode == "run":
        run(args.plan)
    else:
        report(args.plan, args.ncu, args.out)


if __name__ == "__main__":
    main()
