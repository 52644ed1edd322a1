"""The GEMV's launch shapes by GPU time (session 8) against the wall-clock ones (session 7), alternated in one
process: pipelined decode tok/s.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.launch_shapes_ab --out FILE --presets 31B

For each preset (random 4-bit weights) and 512 and 4096 cached tokens (growing over the rounds, alike for
both), ROUNDS rounds of STEPS decode steps with each table; the layers re-plan on every switch.
"""

import argparse
import json
import statistics
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.kernels import quantized_matmul as qmm
from mlx_gemma4.model.quantized_linear import use_kernel_layers
from mlx_gemma4.presets import random_model

from .kv_quant_speed import decode_rate, filled_cache

ROUNDS = 6
STEPS = 48
# LAUNCH_SHAPES["cuda"] of session 7 (benchmarks/results/gemv_sweep.md, wall clock)
WALL_CLOCK = (
    (1, 5376, 5376, 2048, 2048, 8, 4),
    (1, 5376, 5376, 4096, 4096, 4, 1),
    (1, 5376, 5376, 8192, 8192, 8, 2),
    (1, 5376, 5376, 16384, 16384, 8, 2),
    (1, 16384, 16384, 5376, 5376, 8, 1),
    (1, 5376, 5376, 262144, 262144, 8, 2),
)


def alternated(model, cache) -> dict:
    tables = {"gpu time": qmm.LAUNCH_SHAPES["cuda"], "wall clock": WALL_CLOCK}
    rates = {name: [] for name in tables}
    for _ in range(ROUNDS):
        for name, table in tables.items():
            qmm.LAUNCH_SHAPES["cuda"] = table
            qmm.launch_shape.cache_clear()
            use_kernel_layers(model)
            rates[name].append(decode_rate(model, cache, STEPS))
    qmm.LAUNCH_SHAPES["cuda"] = tables["gpu time"]
    qmm.launch_shape.cache_clear()
    medians = {name: statistics.median(samples) for name, samples in rates.items()}
    return {"tok_s": rates, "median": medians, "gpu_time_over_wall_clock": medians["gpu time"] / medians["wall clock"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    parser.add_argument("--presets", nargs="+", default=["31B"])
    args = parser.parse_args()
    rows = {}
    for preset in args.presets:
        model = random_model(preset, bits=4)
        for context in (512, 4096):
            rows[f"{preset}@{context}"] = row = alternated(model, filled_cache(model, None, context))
            print(preset, context, json.dumps(row["median"]), f"ratio {row['gpu_time_over_wall_clock']:.3f}", flush=True)
            args.out.write_text(json.dumps({"mlx": mx.__version__, "rounds": ROUNDS, "steps": STEPS, "rows": rows},
                                           indent=1))
        del model
        mx.clear_cache()


if __name__ == "__main__":
    main()
