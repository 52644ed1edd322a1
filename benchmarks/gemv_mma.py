"""The matrix-unit GEMV (kernels/quantized_gemv_mma.py) against the float GEMV and MLX's op, launch shapes swept.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.gemv_mma --out benchmarks/results/gemv_mma

For each decode weight shape of 31B, E2B and 26B-A4B's dense branch (4-bit, group 64, bf16 x; --rows rows)
and each TILESxNSG launch of the MMA GEMV: µs per call, timed as benchmarks/gemv_sweep.py times (a batch of
calls on distinct weight copies of >= 256 MB, its graph built before the clock), its fraction of the copy
bandwidth and its error against the float32 definition; beside it the float GEMV at the launch the model
uses and MLX's op. The fused gate/up GEMVs of each model likewise. Writes gemv_mma.json and gemv_mma.md
under --out; each row is printed as it comes.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.kernels import backend
from mlx_gemma4.kernels import quantized_gemv_mma as mma
from mlx_gemma4.kernels import quantized_matmul as qmm
from mlx_gemma4.kernels.kernel import launcher

from .attention import device_name
from .gemv_sweep import launch_shapes, seconds_per_call
from .measure import memory_bandwidth
from .quantized_matmul import copies

# (K, N) of each model's decode projections; "gate/up" also runs fused
SHAPES = {
    "31B": {"k_proj": (5376, 2048), "k/v_proj": (5376, 4096), "q_proj": (5376, 8192), "q_proj global": (5376, 16384),
            "o_proj": (8192, 5376), "o_proj global": (16384, 5376), "gate/up": (5376, 21504), "down": (21504, 5376),
            "lm_head": (5376, 262144)},
    "E2B": {"k/v_proj": (1536, 256), "q_proj": (1536, 2048), "o_proj": (2048, 1536), "gate/up": (1536, 6144),
            "down": (6144, 1536), "lm_head": (1536, 262144)},
    "26B-A4B dense": {"q_proj": (2816, 4096), "o_proj": (4096, 2816), "gate/up": (2816, 2112), "down": (2112, 2816)},
}
LAUNCHES = ["1x1", "1x2", "1x4", "1x8", "2x1", "2x2", "2x4", "4x1", "4x2"]


def measure(name, k, n, rows, launches, group, dtype, copy, fused) -> dict:
    count = 2 if fused else 1
    weights = [sum(ws, ()) for ws in zip(*(map(tuple, copies(k, n, 4, group, dtype)) for _ in range(count)))]
    nbytes = sum(a.nbytes for a in weights[0])
    x = mx.random.normal((rows, k)).astype(dtype)
    run = launcher(backend())
    if fused:
        want = qmm.geglu_reference(x, weights[0][:3], weights[0][3:], group, 4)
        ours = lambda x, *w: qmm.gemv(run, x, *w[:3], group, 4, up=w[3:])
        candidates = {f"{t}x{s}": (lambda t, s: lambda x, *w: mma.gemv(run, x, *w[:3], group, t, s, up=w[3:]))(t, s)
                      for t, s in launches}
    else:
        want = qmm.reference(x, *weights[0], group, 4)
        ours = lambda x, *w: qmm.gemv(run, x, *w, group, 4)
        candidates = {f"{t}x{s}": (lambda t, s: lambda x, *w: mma.gemv(run, x, *w, group, t, s))(t, s)
                      for t, s in launches}
        candidates["mlx"] = lambda x, *w: qmm.mlx_matmul(x, *w, group, 4)
    candidates["float GEMV"] = ours
    row = dict(model=name[0], shape=name[1], fused=fused, K=k, N=n, rows=rows, mb=round(nbytes / 1e6, 1), runs={})
    for label, fn in candidates.items():
        gap = qmm.error(fn(x, *weights[0]), want)
        us = 1e6 * seconds_per_call(fn, x, weights)
        row["runs"][label] = dict(us=round(us, 2), of_copy=round(nbytes / us / 1e3 / copy, 3), error=gap,
                                  error_ok=gap <= qmm.TOLERANCE[dtype])
    mma_runs = {label: r for label, r in row["runs"].items() if "x" in label and label[0].isdigit() and r["error_ok"]}
    row["best"] = min(mma_runs, key=lambda label: mma_runs[label]["us"]) if mma_runs else None
    default = mma.default_launch(k, n, group, rows)
    row["default"] = f"{default[0]}x{default[1]}"
    print(json.dumps({key: v for key, v in row.items() if key != "runs"} | {
        label: (r["us"], r["of_copy"]) for label, r in row["runs"].items()}), flush=True)
    del weights
    mx.clear_cache()
    return row


def markdown(result: dict) -> str:
    copy = result["copy_gbs"]
    labels = list(dict.fromkeys(label for row in result["rows"] for label in row["runs"]))
    lines = [f"# The matrix-unit GEMV against the float GEMV and MLX ({result['device']}, mlx {result['mlx']})", "",
             f"4-bit, group {result['group_size']}, {result['dtype']} x; copy bandwidth {copy:.0f} GB/s. µs per call "
             "(% of copy bandwidth); TILESxNSG are the MMA GEMV's launches; ✗ = error over tolerance.", "",
             "| model | shape | fused | K | N | rows | MB | " + " | ".join(labels) + " | best MMA / float GEMV |",
             "|---|---|---|---:|---:|---:|---:|" + "---:|" * (len(labels) + 1)]
    for row in result["rows"]:
        runs = row["runs"]
        cells = [f"{r['us']} ({100 * r['of_copy']:.0f} %){'' if r['error_ok'] else ' ✗'}" if (r := runs.get(label))
                 else "" for label in labels]
        gain = runs["float GEMV"]["us"] / runs[row["best"]]["us"] if row["best"] else float("nan")
        lines.append(f"| {row['model']} | {row['shape']} | {'yes' if row['fused'] else ''} | {row['K']} | {row['N']} | "
                     f"{row['rows']} | {row['mb']} | " + " | ".join(cells) + f" | {gain:.2f}x ({row['best']}) |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--launches", nargs="*", default=LAUNCHES, help="MMA GEMV launches TILESxNSG")
    parser.add_argument("--rows", nargs="+", type=int, default=[1])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    args = parser.parse_args()
    if backend() == "reference":
        raise SystemExit("no GPU kernel backend here (MLX_GEMMA4_KERNELS=cuda on an NVIDIA GPU)")
    launches, dtype = launch_shapes(args.launches), getattr(mx, args.dtype)
    copy = memory_bandwidth(2**30)["copy"]
    result = dict(device=device_name(), mlx=mx.__version__, group_size=args.group_size, dtype=args.dtype,
                  copy_gbs=copy, rows=[])
    print(f"copy bandwidth {copy:.0f} GB/s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for rows in args.rows:
        for model in args.models:
            for shape, (k, n) in SHAPES[model].items():
                for fused in (False, True) if shape == "gate/up" else (False,):
                    result["rows"].append(measure((model, shape), k, n, rows, launches, args.group_size, dtype, copy,
                                                  fused))
                    result["seconds"] = round(time.perf_counter() - start, 1)
                    (args.out / "gemv_mma.json").write_text(json.dumps(result, indent=1) + "\n")
                    (args.out / "gemv_mma.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
