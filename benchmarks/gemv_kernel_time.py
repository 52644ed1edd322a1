"""The quantized GEMV's launch shapes timed on the GPU alone, by Nsight Compute: bandwidth without host costs.

    ncu --csv --metrics gpu__time_duration.sum --clock-control none -k regex:"quantized_gemv|bandwidth_copy" \
        python -m benchmarks.gemv_kernel_time run --plan P.json > K.csv
    python -m benchmarks.gemv_kernel_time report --plan P.json --ncu K.csv --out benchmarks/results/gemv_kernel_time

Timed by wall clock (benchmarks/gemv_sweep.py), a GEMV of a few MB measures the host, which encodes a custom
kernel's launch in 3-6 µs (launch_cost.md), and a batch of a few calls of a larger one carries the
evaluation's start and end. Here ncu times each kernel on the device (caches flushed before each, as a
decode step finds its weights: out of L2; clocks left to the GPU). `run` calls the GEMV REPEATS times at
every RPSxNSG launch on each decode shape of 31B, E2B and 26B-A4B's dense branch (1 row, 4-bit g64 bf16;
gate/up also fused), and a plain float4 copy of 1 GB, timed the same way, for the copy bandwidth; `report`
pairs ncu's rows with the plan's calls (same order) and writes gemv_kernel_time.json and .md under --out:
µs and % of copy bandwidth per launch, the model's launch (LAUNCH_SHAPES) beside the fastest.
"""

import argparse
import csv
import json
import statistics
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.kernels import quantized_matmul as qmm
from mlx_gemma4.kernels.kernel import launcher

from .attention import device_name
from .gemv_sweep import SINGLE, launch_shapes
from .quantized_matmul import packed

# (K, N) of each model's decode projections at 1 row; "gate/up" also runs fused, as the model does
SHAPES = {
    "31B": {"k_proj": (5376, 2048), "k/v_proj": (5376, 4096), "q_proj": (5376, 8192), "q_proj global": (5376, 16384),
            "o_proj": (8192, 5376), "o_proj global": (16384, 5376), "gate/up": (5376, 21504), "down": (21504, 5376),
            "lm_head": (5376, 262144)},
    "E2B": {"k/v_proj": (1536, 256), "q_proj": (1536, 2048), "o_proj": (2048, 1536), "gate/up": (1536, 6144),
            "down": (6144, 1536), "lm_head": (1536, 262144)},
    "26B-A4B dense": {"q_proj": (2816, 4096), "o_proj": (4096, 2816), "gate/up": (2816, 2112), "down": (2112, 2816)},
}
REPEATS = 2
COPY_BYTES = 2**30
COPY_SOURCE = """
    const size_t n = a_shape[0] / 4;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        reinterpret_cast<float4*>(b)[i] = reinterpret_cast<const float4*>(a)[i];
    }
"""


def run(plan: Path, launches: list, models: list):
    calls = []
    copy = mx.fast.cuda_kernel(name="bandwidth_copy", input_names=["a"], output_names=["b"], source=COPY_SOURCE)
    a = mx.random.uniform(shape=(COPY_BYTES // 4,))
    mx.eval(a)
    for _ in range(REPEATS):
        mx.eval(copy(inputs=[a], grid=(132 * 8 * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[a.shape],
                     output_dtypes=[a.dtype])[0])
        calls.append(dict(kind="copy", bytes=2 * COPY_BYTES))
    del a
    cuda = launcher("cuda")
    for model in models:
        for shape, (k, n) in SHAPES[model].items():
            for fused in (False, True) if shape == "gate/up" else (False,):
                weights = packed(k, n, 4, 64, mx.bfloat16) + (packed(k, n, 4, 64, mx.bfloat16) if fused else ())
                x = mx.random.normal((1, k)).astype(mx.bfloat16)
                mx.eval(x, weights)
                up = dict(up=weights[3:]) if fused else {}
                for rps, nsg in launches:
                    for _ in range(REPEATS):
                        mx.eval(qmm.gemv(cuda, x, *weights[:3], 64, 4, nsg, rps=rps, **up))
                        calls.append(dict(kind="fused" if fused else "gemv", model=model, shape=shape, K=k, N=n,
                                          bytes=sum(w.nbytes for w in weights), launch=f"{rps}x{nsg}"))
                del weights
                mx.clear_cache()
    plan.write_text(json.dumps(dict(device=device_name(), mlx=mx.__version__, calls=calls), indent=1))


UNITS = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def report(plan: Path, ncu: Path, out: Path):
    planned = json.loads(plan.read_text())
    lines = [line for line in ncu.read_text().splitlines() if line.startswith('"')]
    rows = [r for r in csv.DictReader(lines) if r["Metric Name"] == "gpu__time_duration.sum"]
    if len(rows) != len(planned["calls"]):
        raise SystemExit(f"ncu timed {len(rows)} kernels, the plan made {len(planned['calls'])}")
    times = {}
    for call, row in zip(planned["calls"], rows):
        us = float(row["Metric Value"].replace(",", "")) * UNITS[row["Metric Unit"]]
        key = "copy" if call["kind"] == "copy" else (call["kind"], call["model"], call["shape"], call["K"], call["N"],
                                                      call["bytes"])
        times.setdefault(key, {}).setdefault(call.get("launch"), []).append(us)
    copy_gbs = 2 * COPY_BYTES / statistics.median(times.pop("copy")[None]) / 1e3
    results = []
    for (kind, model, shape, k, n, nbytes), by_launch in times.items():
        us = {launch: round(statistics.median(t), 2) for launch, t in by_launch.items()}
        fastest = min(us, key=us.get)
        current = "{}x{}".format(*qmm.launch_shape("cuda", k, n, 1, 4))
        results.append(dict(kind=kind, model=model, shape=shape, K=k, N=n, mb=round(nbytes / 1e6, 1), us=us,
                            best=fastest, best_of_copy=round(nbytes / us[fastest] / 1e3 / copy_gbs, 3), model_launch=current,
                            model_of_copy=round(nbytes / us[current] / 1e3 / copy_gbs, 3) if current in us else None))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_kernel_time.json").write_text(json.dumps(dict(device=planned["device"], mlx=planned["mlx"],
                                                               copy_gbs=copy_gbs, rows=results), indent=1) + "\n")
    launches = list(dict.fromkeys(launch for r in results for launch in r["us"]))
    table = [f"# GEMV time on the GPU, by Nsight Compute ({planned['device']}, mlx {planned['mlx']})", "",
             f"1 row, 4-bit, group 64, bf16 x; median of {REPEATS} kernels each, caches flushed before each. Copy "
             f"bandwidth {copy_gbs:.0f} GB/s (a float4 copy of 1 GB, timed the same way). µs; RPSxNSG launches.", "",
             "| kind | model | shape | K | N | MB | " + " | ".join(launches) + " | fastest (% of copy) | model's (% of copy) |",
             "|---|---|---|---:|---:|---:|" + "---:|" * (len(launches) + 2)]
    for r in results:
        model_cell = f"{r['model_launch']} ({100 * r['model_of_copy']:.0f} %)" if r["model_of_copy"] else r["model_launch"]
        table.append(f"| {r['kind']} | {r['model']} | {r['shape']} | {r['K']} | {r['N']} | {r['mb']} | "
                     + " | ".join(str(r["us"].get(launch, "")) for launch in launches)
                     + f" | {r['best']} ({100 * r['best_of_copy']:.0f} %) | {model_cell} |")
    (out / "gemv_kernel_time.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("run", "report"))
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--ncu", type=Path, help="ncu's CSV (report)")
    parser.add_argument("--out", type=Path, help="folder for the results (report)")
    parser.add_argument("--launches", nargs="*", default=SINGLE, help="launch shapes RPSxNSG (run)")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    if args.mode == "run":
        run(args.plan, launch_shapes(args.launches), args.models)
    else:
        report(args.plan, args.ncu, args.out)


if __name__ == "__main__":
    main()
