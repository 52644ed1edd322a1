"""Side-by-side generation speed: mlx-gemma4 vs mlx-lm's own Gemma 4, same weights, same process.

Both stacks run their own stream_generate (prefill, sampling, detokenizing) greedily for a fixed
number of tokens (EOS disabled), alternating, several rounds; we report the median of each.

    python -m benchmarks.generation                        # the bundled tiny model on this machine
    python -m benchmarks.generation --model PATH --out benchmarks/results/NAME.json

mlx-lm 0.32 reads only the older `global_head_dim` spelling, so it is given a copy of the folder
whose config.json is rewritten that way (benchmarks/compat.py).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np

import mlx_gemma4
from benchmarks.compat import older_spelling_copy
from mlx_gemma4.generate import SamplingParams, stream_generate


def ours(model, tokenizer, prompt, n):
    last = None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=n, sampling=SamplingParams(temperature=0.0)):
        pass
    return last.prompt_tps, last.generation_tps, last.generation_tokens


def theirs(model, tokenizer, prompt, n):
    last = None
    for last in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=n):
        pass
    return last.prompt_tps, last.generation_tps, last.generation_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(mlx_gemma4.BUNDLED_MODEL))
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    model, tokenizer = mlx_gemma4.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        lm_model, lm_tokenizer = mlx_lm.load(str(older_spelling_copy(Path(args.model), Path(tmp))))
    tokenizer.eos_token_ids = lm_tokenizer.eos_token_ids = []  # fixed-length runs
    vocab = model.config.vocab_size
    prompt = np.random.default_rng(0).integers(10, vocab, args.prompt_tokens).tolist()
    runs = {"mlx-gemma4": [], "mlx-lm": []}
    ours(model, tokenizer, prompt, 8), theirs(lm_model, lm_tokenizer, prompt, 8)  # warm up
    for _ in range(args.rounds):
        runs["mlx-gemma4"].append(ours(model, tokenizer, prompt, args.gen_tokens))
        runs["mlx-lm"].append(theirs(lm_model, lm_tokenizer, prompt, args.gen_tokens))
    result = {
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "rounds": args.rounds,
        "device": str(mx.default_device()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine slows both stacks alike
        "versions": {"mlx": mx.__version__, "mlx-lm": mlx_lm.__version__},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
    for name, values in runs.items():
        result[name] = {
            "prompt_tps": statistics.median(v[0] for v in values),
            "generation_tps": statistics.median(v[1] for v in values),
        }
    result["generation_ratio"] = result["mlx-gemma4"]["generation_tps"] / result["mlx-lm"]["generation_tps"]
    result["prompt_ratio"] = result["mlx-gemma4"]["prompt_tps"] / result["mlx-lm"]["prompt_tps"]
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
