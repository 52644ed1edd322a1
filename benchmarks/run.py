"""Benchmark mlx-gemma4 against mlx-lm's Gemma 4 on the same weights: JSON, a Markdown table, a PNG plot.

    python -m benchmarks.run E2B E4B 26B-A4B 31B --bits 4 --depths 0 4096 16384
    python -m benchmarks.run E2B --bits 4 --layers 6 --vocab 4096 --gen-tokens 8 --depths 0 256  # 2 CPU cores
    python -m benchmarks.run path/to/checkpoint

Per model: a logits check (ours and mlx-lm must agree, else the comparison is void), one warm-up run
of each runtime, then `--repeats` rounds of every case, alternating runtimes. Cases: a prompt of
`--prompt-tokens` then `--gen-tokens` generated (the mlx_lm.benchmark form; its prompt rate is
llama-bench's ppN), and for each depth d a prompt of d tokens then `--gen-tokens` generated (tgN @ dd).
Results are rewritten after every case, so a run cut short keeps what finished.
"""

import argparse
import gc
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np

from mlx_gemma4 import presets

from . import report
from .measure import RUNTIMES, memory_bandwidth, summary, timed_run, weight_bytes
from .pair import Pair, check_same_logits, from_checkpoint, from_preset
from .roofline import bytes_per_token, weight_bytes_per_token

FIELDS = ("prompt_tps", "generation_tps", "peak_memory_gb")
WARMUP_TOKENS = 16


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help=f"presets ({', '.join(presets.PRESETS)}) or checkpoint folders")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="quantize presets and unquantized checkpoints")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="presets' float type; default bfloat16 on a GPU, float32 on the CPU (far faster there)")
    parser.add_argument("--layers", type=int, help="cut presets to this many decoder layers")
    parser.add_argument("--vocab", type=int, help="cut presets' vocabulary to this many tokens")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--depths", type=int, nargs="+", help="context depths for tgN; default 0 8192 32768 (GPU), 0 1024 (CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-step", type=int, default=2048, help="prompt chunk for both runtimes")
    parser.add_argument("--bandwidth-bytes", type=int, help="bandwidth probe size; default 4 GiB (GPU), 512 MiB (CPU)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for NAME.json, NAME.md, NAME.png")
    parser.add_argument("--name", help="file name stem; default DATE-DEVICE-QUANT")
    args = parser.parse_args(argv)
    if args.gen_tokens < 2:
        parser.error("--gen-tokens must be at least 2 (a generation rate needs two tokens)")
    return args


def main(argv=None) -> Path:
    """Run the benchmark; returns the output path without suffix."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.depths = args.depths or ([0, 8192, 32768] if on_gpu else [0, 1024])
    probe = args.bandwidth_bytes or (4 << 30 if on_gpu else 512 << 20)
    results = header(args, argv, on_gpu, memory_bandwidth(probe))
    stem = Path(args.out) / (args.name or default_name(results))
    print(f"device {results['device']['name']}: bandwidth {results['device']['bandwidth_gbps']}", flush=True)
    for model in args.models:
        pair = build(model, args)
        entry = {
            "model": pair.name,
            "layers": pair.ours.config.num_hidden_layers,
            "weights_gb": weight_bytes(pair.ours) / 1e9,
            "weights_read_per_token_gb": weight_bytes_per_token(pair.ours) / 1e9,
            "logits_check": check_same_logits(pair),
            "runs": [],
            "rows": [],
        }
        print(f"{pair.name}: logits check {entry['logits_check']}", flush=True)
        results["models"].append(entry)
        benchmark(pair, args, entry, results["device"]["bandwidth_used_gbps"], lambda: report.write(results, stem))
        del pair
        gc.collect()
        mx.clear_cache()
    return stem


def build(model: str, args) -> Pair:
    if model in presets.PRESETS:
        return from_preset(model, args.bits, args.group_size, getattr(mx, args.dtype), args.layers, args.vocab)
    return from_checkpoint(model, args.bits, args.group_size)


def benchmark(pair: Pair, args, entry: dict, bandwidth_gbps: float, save) -> None:
    models = {"ours": pair.ours, "mlx-lm": pair.theirs}
    rng = np.random.default_rng(0)
    vocab = pair.ours.config.vocab_size

    def prompt(length: int) -> mx.array:
        return mx.array(rng.integers(0, vocab, max(length, 1)), dtype=mx.int32)

    warm = prompt(args.prompt_tokens)
    for runtime, model in models.items():
        timed_run(runtime, model, warm, min(args.gen_tokens, WARMUP_TOKENS), args.prefill_step)
    cases = [("pp", args.prompt_tokens)] + [("tg", depth) for depth in args.depths]
    for kind, length in cases:
        tokens = prompt(length)
        runs = {runtime: [] for runtime in RUNTIMES}
        for repeat in range(args.repeats):
            # Alternate which runtime goes first, so first-use costs (kernel JIT at new shapes) fall on both.
            order = list(models.items())[:: -1 if repeat % 2 else 1]
            for runtime, model in order:
                runs[runtime].append(timed_run(runtime, model, tokens, args.gen_tokens, args.prefill_step))
        case = {"prompt_tokens": tokens.size, "gen_tokens": args.gen_tokens}
        for runtime, samples in runs.items():
            case[runtime] = {f: summary([getattr(s, f) for s in samples]) for f in FIELDS}
        entry["runs"].append(case)
        if kind == "pp":
            row = table_row(f"pp{length}", case, "prompt_tps")
        else:
            row = table_row(f"tg{args.gen_tokens}" + (f" @ d{length}" if length else ""), case, "generation_tps")
            # Decode steps run at depths length .. length + gen_tokens; charge the KV reads at the middle.
            roofline = bandwidth_gbps * 1e9 / bytes_per_token(pair.ours, length + args.gen_tokens // 2)
            row["roofline_tps"] = roofline
            row["roofline_pct"] = {runtime: 100 * row[runtime] / roofline for runtime in RUNTIMES}
        row["depth"] = length if kind == "tg" else 0
        entry["rows"].append(row)
        print(f"{entry['model']} {report.row_line(row)}", flush=True)
        save()


def table_row(test: str, case: dict, metric: str) -> dict:
    row = {"test": test, "metric": metric}
    for runtime in RUNTIMES:
        stat = case[runtime][metric]
        row[runtime] = stat["median"]
        row[f"{runtime}_spread_pct"] = 100 * (stat["max"] - stat["min"]) / stat["median"]
    row["ratio"] = row["ours"] / row["mlx-lm"]
    return row


def header(args, argv, on_gpu: bool, bandwidth: dict) -> dict:
    info = mx.device_info()
    return {
        "schema": 1,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(argv),
        "device": {
            "name": info.get("device_name") or platform.processor() or platform.machine(),
            "backend": "gpu" if on_gpu else "cpu",
            "bandwidth_gbps": {"read": bandwidth["read"], "copy": bandwidth["copy"]},
            "bandwidth_used_gbps": max(bandwidth["read"], bandwidth["copy"]),
        },
        "versions": {"mlx": mx.__version__, "mlx-lm": mlx_lm.__version__, "python": platform.python_version()},
        "commit": git_commit(),
        "settings": {
            k: getattr(args, k)
            for k in ("bits", "group_size", "dtype", "layers", "vocab", "prompt_tokens", "gen_tokens", "depths",
                      "repeats", "prefill_step")
        },
        "models": [],
    }


def git_commit() -> str:
    """HEAD (+dirty); BENCH_COMMIT where the tree was copied without .git (the GPU machine)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BENCH_COMMIT", "unknown")


def default_name(results: dict) -> str:
    device = re.sub(r"[^a-z0-9]+", "-", results["device"]["name"].lower()).strip("-")
    bits = results["settings"]["bits"]
    return f"{results['date'][:10]}-{device}-{f'{bits}bit' if bits else results['settings']['dtype']}"


if __name__ == "__main__":
    main()
