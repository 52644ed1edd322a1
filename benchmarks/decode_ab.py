"""Two configurations of the runtime alternated in one process on the same model and cache: pipelined decode
tok/s, so that this host's drift (rounds of one configuration spread by ±20 %) hits both alike."""

import argparse
import json
import statistics
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.presets import random_model

from .kv_quant_speed import decode_rate, filled_cache

ROUNDS = 6
STEPS = 48
CONTEXTS = (512, 4096)


def alternated(model, cache, variants: dict) -> dict:
    """ROUNDS rounds of STEPS steps with each variant, `variants` {name: switch(model)} in turns."""
    rates = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, switch in variants.items():
            switch(model)
            rates[name].append(decode_rate(model, cache, STEPS))
    medians = {name: statistics.median(samples) for name, samples in rates.items()}
    first, second = medians
    return {"tok_s": rates, "median": medians, f"{first}_over_{second}": medians[first] / medians[second]}


def main(description: str, variants: dict, restore, presets: list):
    """Each preset (random 4-bit weights) at CONTEXTS cached tokens: the variants alternated; then `restore(model)`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    parser.add_argument("--presets", nargs="+", default=presets)
    args = parser.parse_args()
    rows = {}
    for preset in args.presets:
        model = random_model(preset, bits=4)
        for context in CONTEXTS:
            rows[f"{preset}@{context}"] = row = alternated(model, filled_cache(model, None, context), variants)
            restore(model)
            print(preset, context, json.dumps(row), flush=True)
            args.out.write_text(json.dumps({"mlx": mx.__version__, "rounds": ROUNDS, "steps": STEPS, "rows": rows},
                                           indent=1))
        del model
        mx.clear_cache()
