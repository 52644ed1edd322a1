"""Where a decode step's time goes on a GPU: building its graph on the host, evaluating it, and the
pipelined step that generation runs, with the share of time the GPU was busy (nvidia-smi). Says whether
decode is bound by the host (building and encoding ops) or by the GPU (kernels).

Per preset (random 4-bit weights as the loaders would run them, a bf16 cache filled to --context):
- build: host time of one step's graph (the model call and the argmax), nothing evaluated;
- encode: `mx.async_eval` of that graph, which returns once its launches are encoded for the GPU;
- eval: from there until the step's token is ready (encoding included);
- step: the pipelined step (benchmarks/kv_quant_speed.py decode_rate: the next step is queued before the
  previous token is read), measured while nvidia-smi samples the GPU's utilization (the share of each
  sample period in which some kernel ran).
If step ≈ build + eval and the GPU is busy well under 100 %, the host is the bound.

    python -m benchmarks.decode_time_split --out benchmarks/results/decode_time_split.json
"""

import argparse
import json
import subprocess
import time
from pathlib import Path
from statistics import median

import mlx.core as mx

from mlx_gemma4.presets import random_model

from .attention import device_name
from .kv_quant_speed import decode_rate, filled_cache


def split(model, cache, steps: int) -> dict:
    """Median build and eval milliseconds over `steps` synchronous steps."""
    token, builds, encodes, evals = mx.array([[1]], mx.int32), [], [], []
    for _ in range(steps + 2):
        start = time.perf_counter()
        token = mx.argmax(model(token, cache=cache)[:, -1, :], axis=-1)[:, None]
        built = time.perf_counter()
        mx.async_eval(token)
        encoded = time.perf_counter()
        mx.eval(token)
        builds.append(built - start)
        encodes.append(encoded - built)
        evals.append(time.perf_counter() - built)
    return {"build_ms": 1e3 * median(builds[2:]), "encode_ms": 1e3 * median(encodes[2:]),
            "eval_ms": 1e3 * median(evals[2:])}


def busy_while(run) -> tuple:
    """run()'s result and the GPU utilization samples (%) nvidia-smi took meanwhile (every 50 ms)."""
    sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                "-lms", "50"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)  # its first sample is taken before the run
    try:
        result = run()
    finally:
        sampler.terminate()
    samples = [int(s) for s in sampler.communicate()[0].split() if s.isdigit()]
    return result, samples[1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    parser.add_argument("--presets", nargs="+", default=["E2B", "31B"])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32, help="synchronous steps timed")
    parser.add_argument("--seconds", type=float, default=3.0, help="about how long the pipelined run lasts")
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        model = random_model(preset, bits=4)
        cache = filled_cache(model, None, args.context)
        row = {"preset": preset, "context": args.context, **split(model, cache, args.steps)}
        pipelined_steps = max(8, int(args.seconds * 1e3 / (row["build_ms"] + row["eval_ms"])))
        rate, samples = busy_while(lambda: decode_rate(model, cache, pipelined_steps))
        row.update(step_ms=1e3 / rate, steps=pipelined_steps, gpu_busy_percent=samples,
                   gpu_busy_median=median(samples) if samples else None)
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps({"device": device_name(), "mlx": mx.__version__, "rows": rows}, indent=1))
        del model, cache
        mx.clear_cache()


if __name__ == "__main__":
    main()
