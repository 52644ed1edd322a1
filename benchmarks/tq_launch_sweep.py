"""TurboQuant decode attention's launch geometry swept at Gemma 4's layouts: which is fastest per layer and key count.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.tq_launch_sweep --out benchmarks/results/tq_launch_sweep

A geometry (kernels/tq_attention.py's `Geometry`) is HPS, the query heads a simdgroup scores from one decode
of a key's codes (a template constant: one NVRTC build per value, 3-20 s each), MIN_CHUNK, the fewest keys a
threadgroup walks, and the threadgroups a long cache is spread over (both only shape the grid). For each
layout of benchmarks/tq_attention.py (E2B and 31B; sliding layers at their window, global layers at 8K,
32K and 128K keys; batch 1, bf16 queries, 4/4-bit codes, no mask) every candidate geometry is checked
against the reference and timed as benchmarks/attention.py times a decode call (the median over trials of
16 independent calls evaluated together, per call). Candidates that launch the same grid at a row's key
count are timed once. Per row the fastest geometry replaces today's default only when it is at least
MIN_GAIN faster (closer timings are noise); among those that launch alike, the one nearest the default.
Then the LAUNCH_SHAPES rules that encode the bests (paste into kernels/tq_attention.py): a layout's key
counts split at the geometric mean of neighbouring measured counts, the last rule unbounded. Writes
tq_launch_sweep.json and tq_launch_sweep.md under --out after every row. The defaults take about
3 minutes on an H100, mostly kernel builds; --quick times the global layers at 32K keys only and the
default threadgroups.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.kernels import backend
from mlx_gemma4.kernels.kernel import launcher
from mlx_gemma4.kernels.tq_attention import (
    MAX_HEADS_PER_SIMDGROUP, ROUNDED_TOLERANCE, Geometry, default_geometry, heads_fit, launch_grid, launch_plan,
    reference,
)
from mlx_gemma4.turboquant.codec import TurboQuantCodec

from .attention import CALLS, device_name, seconds_per_call
from .tq_attention import BITS, CONTEXTS, LAYOUTS

MIN_CHUNKS = [16, 32, 64, 128]
THREADGROUPS = [512, 1024]
QUICK_CONTEXTS = [32768]
MIN_GAIN = 1.03  # a geometry replaces the default only this much faster


def heads_choices(dim: int, group: int) -> list:
    """HPS values the register budget allows: divisors of G, at most MAX_HEADS_PER_SIMDGROUP, HPS·D within it."""
    return [h for h in range(1, MAX_HEADS_PER_SIMDGROUP + 1) if heads_fit(h, dim, group)]


def candidates(dim: int, group: int, heads: list, min_chunks: list, threadgroups: list) -> list:
    """Geometries to time, the default first, then by how many of its fields they change (ties: stable)."""
    default = default_geometry(dim, group)
    allowed = [h for h in heads if h in heads_choices(dim, group)]
    options = {Geometry(h, c, t) for h in allowed for c in min_chunks for t in threadgroups}
    changed = lambda g: sum(a != b for a, b in zip(g, default))
    return [default] + sorted(options - {default}, key=lambda g: (changed(g), g))


def rows_of(dim: int, kv_heads: int, keys_count: int, seed: int) -> tuple:
    """Packed 4-bit key and value rows [1, HKV, S, words + 1] of random vectors, and their codecs."""
    k_codec, v_codec = TurboQuantCodec(dim, BITS, seed=1), TurboQuantCodec(dim, BITS, seed=2)
    rng = mx.random.split(mx.random.key(seed), 2)
    k_rows = k_codec.encode(mx.random.normal((1, kv_heads, keys_count, dim), key=rng[0]).astype(mx.bfloat16))
    v_rows = v_codec.encode(mx.random.normal((1, kv_heads, keys_count, dim), key=rng[1]).astype(mx.bfloat16))
    mx.eval(k_rows, v_rows)
    return k_rows, v_rows, k_codec, v_codec


def sweep_row(layer: str, keys_count: int, geometries: list) -> list:
    """One result per candidate geometry at this layer and key count; alike launches share one timing."""
    dim, heads, kv_heads, _ = LAYOUTS[layer]
    group = heads // kv_heads
    k_rows, v_rows, k_codec, v_codec = rows_of(dim, kv_heads, keys_count, keys_count + heads)
    rng = mx.random.split(mx.random.key(keys_count), CALLS)
    queries = [mx.random.normal((1, heads, 1, dim), key=k).astype(mx.bfloat16) * dim**-0.25 for k in rng]
    want = reference(queries[0], k_rows, v_rows, k_codec, v_codec, 1.0).astype(mx.float32)
    mx.eval(queries, want)
    launch = launcher(backend())
    grids = {}  # (HPS, chunks) -> the first candidate launching it
    for geometry in geometries:
        _, chunks = launch_grid(geometry, group, kv_heads, keys_count)
        grids.setdefault((geometry.heads_per_simdgroup, chunks), geometry)
    timed, calls = {}, {}
    for grid, geometry in grids.items():
        run = launch_plan(launch, 1, heads, kv_heads, dim, mx.bfloat16, BITS, BITS, False, False, geometry)
        calls[grid] = lambda q, k, v, run=run: run(q, k, v, k_codec, v_codec, 1.0, None, None)
        error = mx.abs(calls[grid](queries[0], k_rows, v_rows).astype(mx.float32) - want).max().item()
        timed[grid] = dict(us=round(seconds_per_call(calls[grid], queries, k_rows, v_rows) * 1e6, 1), max_error=error,
                           error_ok=error <= ROUNDED_TOLERANCE, timed_as=list(geometry))
        print(json.dumps(dict(layer=layer, keys=keys_count, grid=grid, **timed[grid])), flush=True)
    # the default, timed first, again last: a clock that warmed up during the row does not favour the others
    default = next(iter(grids))
    again = round(seconds_per_call(calls[default], queries, k_rows, v_rows) * 1e6, 1)
    timed[default]["us"] = min(timed[default]["us"], again)
    results = []
    for geometry in geometries:
        splits, chunks = launch_grid(geometry, group, kv_heads, keys_count)
        measured = timed[geometry.heads_per_simdgroup, chunks]
        results.append(dict(layer=layer, dim=dim, group=group, kv_rows=kv_heads, keys=keys_count,
                            geometry=list(geometry), splits=splits, chunks=chunks,
                            keys_per_threadgroup=-(-keys_count // chunks), **measured))
    del k_rows, v_rows
    mx.clear_cache()
    return results


def best(sweep: list) -> list:
    """Per (layer, keys): the default's time, the fastest geometry within tolerance, and the chosen one: the
    fastest where it beats the default by MIN_GAIN, else the default."""
    groups = {}
    for r in sweep:
        groups.setdefault((r["layer"], r["keys"]), []).append(r)
    bests = []
    for runs in groups.values():
        good = [r for r in runs if r["error_ok"]]
        if not good:
            continue
        first = runs[0]
        default = list(default_geometry(first["dim"], first["group"]))
        today = next(r for r in runs if r["geometry"] == default)
        fastest = min(good, key=lambda r: r["us"])  # the first of alike launches: the nearest the default
        gain = today["us"] / fastest["us"]
        chosen = fastest if gain >= MIN_GAIN or not today["error_ok"] else today
        bests.append(dict(layer=first["layer"], dim=first["dim"], group=first["group"], kv_rows=first["kv_rows"],
                          keys=first["keys"], default=default, default_us=today["us"], fastest=fastest["geometry"],
                          fastest_us=fastest["us"], gain=round(gain, 3), chosen=chosen["geometry"]))
    return bests


def rules(bests: list) -> list:
    """LAUNCH_SHAPES rules (head dim, group, kv rows, most keys or None, HPS, MIN_CHUNK, threadgroups) that pick
    each row's chosen geometry: per layout, key counts split at the geometric mean of neighbouring measured
    ones, alike neighbours merged, a trailing default left to the fallback."""
    layouts = {}
    for b in bests:
        layouts.setdefault((b["dim"], b["group"], b["kv_rows"]), []).append(b)
    table = []
    for layout, rows in layouts.items():
        rows = sorted(rows, key=lambda b: b["keys"])
        segments = []
        for row, after in zip(rows, rows[1:] + [None]):
            most = None if after is None else round(math.sqrt(row["keys"] * after["keys"]))
            if segments and segments[-1][1] == row["chosen"]:
                segments[-1] = (most, row["chosen"])
            else:
                segments.append((most, row["chosen"]))
        while segments and segments[-1][1] == rows[0]["default"]:
            segments.pop()  # beyond the last rule the default holds anyway
        table += [(*layout, most, *geometry) for most, geometry in segments]
    return table


def markdown(result: dict) -> str:
    lines = [
        f"# TurboQuant decode attention launch geometry ({result['device']}, kernels: {result['backend']}, "
        f"mlx {result['mlx']})", "",
        f"`{result['command']}`; {result['seconds']} s. Batch 1, bf16 queries, {BITS}/{BITS}-bit codes, no mask. "
        "Geometry HPS/MIN_CHUNK/threadgroups (kernels/tq_attention.py `Geometry`); µs per call as "
        "benchmarks/attention.py times a decode call; candidates that launch the same grid timed once (the first "
        f"listed). A row's choice replaces the default only at >= {MIN_GAIN}x; ✗ = error over {ROUNDED_TOLERANCE}.",
        "", "## Launches", "",
        "| layer | keys | geometry | chunks x NK | keys a threadgroup | µs | default / this | max error |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    defaults = {(b["layer"], b["keys"]): b["default_us"] for b in result["best"]}
    for r in result["sweep"]:
        if r["timed_as"] != r["geometry"]:
            continue
        default_us = defaults.get((r["layer"], r["keys"]))
        ratio = f"{default_us / r['us']:.2f}x" if default_us else ""
        lines.append(f"| {r['layer']} | {r['keys']} | {_name(r['geometry'])} | {r['chunks']} x {r['splits']} | "
                     f"{r['keys_per_threadgroup']} | {r['us']} | {ratio} | {r['max_error']:.2g}"
                     f"{'' if r['error_ok'] else ' ✗'} |")
    lines += ["", "## Best per row", "",
              "| layer | keys | default | default µs | fastest | fastest µs | gain | chosen |",
              "|---|---:|---|---:|---|---:|---:|---|"]
    for b in result["best"]:
        lines.append(f"| {b['layer']} | {b['keys']} | {_name(b['default'])} | {b['default_us']} | "
                     f"{_name(b['fastest'])} | {b['fastest_us']} | {b['gain']}x | {_name(b['chosen'])} |")
    lines += ["", "LAUNCH_SHAPES rules (head dim, group, kv rows, most keys, HPS, MIN_CHUNK, threadgroups); none: "
              "every row keeps the default:", "", "```", *(f"{rule}," for rule in result["rules"]), "```"]
    return "\n".join(lines) + "\n"


def _name(geometry: list) -> str:
    return "/".join(map(str, geometry))


def write(out: Path, result: dict):
    """The summary from the sweep so far, and both files (each through a temporary file and a rename)."""
    result["best"] = best(result["sweep"])
    result["rules"] = rules(result["best"])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("tq_launch_sweep.json", json.dumps(result, indent=1) + "\n"),
                       ("tq_launch_sweep.md", markdown(result))):
        partial = out / (name + ".partial")
        partial.write_text(text)
        partial.replace(out / name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for tq_launch_sweep.json/.md")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS), metavar="LAYOUT",
                        help=f"layers to sweep (default all: {', '.join(LAYOUTS)})")
    parser.add_argument("--contexts", type=int, nargs="+", help=f"global layers' key counts (default {CONTEXTS})")
    parser.add_argument("--hps", type=int, nargs="+", default=list(range(1, MAX_HEADS_PER_SIMDGROUP + 1)),
                        help="heads per simdgroup to try (each within the layout's register budget)")
    parser.add_argument("--min-chunks", type=int, nargs="+", default=MIN_CHUNKS)
    parser.add_argument("--threadgroups", type=int, nargs="+", help=f"(default {THREADGROUPS})")
    parser.add_argument("--quick", action="store_true", help=f"global layers at {QUICK_CONTEXTS} keys, threadgroups "
                        f"{THREADGROUPS[:1]} (unless given)")
    args = parser.parse_args()
    if backend() == "reference":
        raise SystemExit("no GPU backend: run on a GPU (MLX_GEMMA4_KERNELS=cuda or metal)")
    contexts = args.contexts or (QUICK_CONTEXTS if args.quick else CONTEXTS)
    threadgroups = args.threadgroups or (THREADGROUPS[:1] if args.quick else THREADGROUPS)
    if min(args.min_chunks + threadgroups + args.hps + contexts) < 1:
        raise SystemExit("--hps, --min-chunks, --threadgroups and --contexts take positive numbers")
    command = " ".join(["python -m benchmarks.tq_launch_sweep", *sys.argv[1:]])
    result = dict(device=device_name(), backend=backend(), mlx=mx.__version__, command=command, seconds=0, sweep=[])
    start = time.perf_counter()
    for layer in args.layouts:
        dim, heads, kv_heads, window = LAYOUTS[layer]
        geometries = candidates(dim, heads // kv_heads, args.hps, args.min_chunks, threadgroups)
        for keys_count in [window] if window else contexts:
            result["sweep"] += sweep_row(layer, keys_count, geometries)
            result["seconds"] = round(time.perf_counter() - start, 1)
            write(args.out, result)
    for b in result["best"]:
        print(json.dumps(b), flush=True)
    print("LAUNCH_SHAPES rules:", *(f"    {rule}," for rule in result["rules"]), sep="\n", flush=True)


if __name__ == "__main__":
    main()
