"""One decode step's GPU timeline: how long the GPU computes, how long it waits between kernels, and which
kernels take the time.

    python -m benchmarks.decode_timeline --preset 31B --out F.json

Decodes STEPS pipelined greedy steps (benchmarks/kv_quant_speed.py decode_rate) of a random 4-bit model
with a bf16 cache of --context tokens, after a warm-up run of the same length, while CUPTI records every
kernel the process runs (benchmarks/cupti.py). The trace is cut into steps at the argmax kernel (one a step): per step
the span from one argmax to the next, the time some kernel ran (busy; MLX runs independent kernels
concurrently), the idle rest (gaps: the GPU waiting for the host, or between a kernel's end and the next
one's start), the number of kernels, and per kernel family their count and summed duration (overlaps
counted in each kernel). If busy is close to the span the GPU is the bound; large gaps mean the
host is.
"""

import argparse
import csv
import gzip
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from .cupti import traced

STEPS = 64
STEP_MARK = re.compile(r"arg_?reduce|argmax", re.I)
FAMILIES = (  # first match wins; names as MLX's CUDA backend gives its kernels and ours
    ("quantized GEMV (ours)", r"quantized_gemv"),
    ("quantized matmul (MLX)", r"qmv|qmm|quantized|affine"),
    ("decode attention (ours)", r"decode_attention|sdpa|attention"),
    ("residual + norm (ours)", r"residual_norm|add_norm|add_scaled"),
    ("q/k/v norms + RoPE (ours)", r"head_norm_rope"),
    ("rms_norm", r"rms_?norm"),
    ("rope", r"rope"),
    ("copy / slice update", r"copy|slice|scatter|gather"),
    ("argmax", STEP_MARK.pattern),
    ("fused elementwise (compiled)", r"compiled|fused"),
    ("elementwise", r"binary|unary|ternary|elementwise"),
    ("reduce", r"reduce|softmax"),
)


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name, re.I):
            return label
    return "other: " + name[:60]


def traced_kernels(preset: str, context: int, steps: int) -> tuple:
    """(tok/s, [(start ns, duration ns, name)] of every kernel) over `steps` decode steps."""
    from mlx_gemma4.presets import random_model

    from .kv_quant_speed import decode_rate, filled_cache

    model = random_model(preset, bits=4)
    cache = filled_cache(model, None, context)
    decode_rate(model, cache, steps)  # warm-up: kernels compiled, buffers cached
    return traced(lambda: decode_rate(model, cache, steps))


def covered(rows: list) -> int:
    """ns in which at least one of the kernels ran (MLX runs independent kernels concurrently)."""
    total, reach = 0, None
    for start, duration, _ in rows:
        end = start + duration
        if reach is None or start >= reach:
            total += duration
        elif end > reach:
            total += end - reach
        reach = end if reach is None else max(reach, end)
    return total


def split(rows: list, steps: int) -> dict:
    """Per step medians and per family means of a decode run's kernels (see the module's docstring)."""
    marks = [i for i, (_, _, name) in enumerate(rows) if STEP_MARK.search(name)]
    marks = marks[-(steps + 1):]  # the run's first steps (first token, warm-up) come before
    spans, busies, counts = [], [], []
    by_family = defaultdict(lambda: [0, 0])
    for a, b in zip(marks, marks[1:]):
        step = rows[a + 1: b + 1]
        spans.append((step[-1][0] + step[-1][1] - (rows[a][0] + rows[a][1])) / 1e3)
        busies.append(covered(step) / 1e3)
        counts.append(len(step))
        for _, d, name in step:
            totals = by_family[family(name)]
            totals[0] += 1
            totals[1] += d
    n = len(spans)
    span, busy = statistics.median(spans), statistics.median(busies)
    families = sorted(((label, c / n, ns / 1e3 / n) for label, (c, ns) in by_family.items()), key=lambda r: -r[2])
    return {
        "steps": n,
        "span_us": span,
        "busy_us": busy,
        "gaps_us": span - busy,
        "kernels_per_step": statistics.median(counts),
        "families": [{"family": label, "per_step": count, "us_per_step": us} for label, count, us in families],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="31B")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the split")
    args = parser.parse_args()
    rate, rows = traced_kernels(args.preset, args.context, args.steps)
    result = {"preset": args.preset, "context": args.context, "tok_s_while_traced": rate, **split(rows, args.steps)}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "families"}))
    for row in result["families"]:
        print(f"{row['family']:<40} {row['per_step']:7.1f} {row['us_per_step']:9.1f} us")
    with gzip.open(args.out.with_suffix(".kernels.csv.gz"), "wt") as f:  # the raw trace, for other cuts
        csv.writer(f).writerows(rows)


if __name__ == "__main__":
    main()
