"""The fused residual + norm kernels on and off, alternated in one process: pipelined decode tok/s.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.residual_norm_ab --out FILE --presets 31B E2B

For each preset (random 4-bit weights) and 512 and 4096 cached tokens (growing by ~600 over the rounds, alike
for both), ROUNDS rounds of STEPS decode steps each way: the kernels serving up to TESTED_ROWS rows (on) or
none (off, MLX's ops; the CUDA default since session 7).
"""

import argparse
import json
import statistics
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.kernels import residual_norm as rn
from mlx_gemma4.presets import random_model

from .kv_quant_speed import decode_rate, filled_cache

ROUNDS = 6
STEPS = 48


def alternated(model, cache) -> dict:
    rates = {"on": [], "off": []}
    for _ in range(ROUNDS):
        for name, rows in (("on", rn.TESTED_ROWS), ("off", 0)):
            rn.MOST_ROWS["cuda"] = rows
            rn._plans.clear()
            rates[name].append(decode_rate(model, cache, STEPS))
    medians = {name: statistics.median(samples) for name, samples in rates.items()}
    return {"tok_s": rates, "median": medians, "on_over_off": medians["on"] / medians["off"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    parser.add_argument("--presets", nargs="+", default=["31B", "E2B"])
    args = parser.parse_args()
    rows = {}
    for preset in args.presets:
        model = random_model(preset, bits=4)
        for context in (512, 4096):
            rows[f"{preset}@{context}"] = row = alternated(model, filled_cache(model, None, context))
            print(preset, context, json.dumps(row["median"]), f"on/off {row['on_over_off']:.3f}", flush=True)
            args.out.write_text(json.dumps({"mlx": mx.__version__, "rounds": ROUNDS, "steps": STEPS, "rows": rows},
                                           indent=1))
        del model
        mx.clear_cache()


if __name__ == "__main__":
    main()
