"""Decode speed and KV memory with TurboQuant 4/4 (also with a 64-token full-precision recent
window) vs the bf16 KV cache, on real-size presets.

The caches are filled with random keys/values to the context length instead of prefilling (a 128K
prefill of 31B would take most of the GPU budget); decode then runs the whole model, every layer
attending over the filled cache (our decode kernels on a GPU: decode_attention for bf16,
tq_attention for TurboQuant). Random 4-bit weights (presets.random_model): speed only, no quality.

Decode is timed as generation runs it (generate.generate_step): each step's graph is built and
queued (mx.async_eval) before the previous step's token is read, so host graph building overlaps
the GPU's work. The caches of one context live side by side and take turns, `--rounds` rounds of
`--steps` steps each; a cache's rate is the median of its rounds and the ratio's spread is the range
of the per-round ratios.

    python -m benchmarks.kv_quant_speed --out benchmarks/results/kv_quant_speed
    python -m benchmarks.kv_quant_speed --out /tmp/kv --presets E2B --contexts 8192 --steps 8 --rounds 1
"""

import argparse
import json
import platform
import time
from pathlib import Path
from statistics import median

import mlx.core as mx

from mlx_gemma4.cache import GROWTH_STEP
from mlx_gemma4.kernels import backend
from mlx_gemma4.presets import random_model
from mlx_gemma4.quantized_cache import KVQuantConfig

CACHES = {"bf16": None, "TurboQuant 4/4": KVQuantConfig("turboquant", 4),
          "TurboQuant 4/4 + recent 64": KVQuantConfig("turboquant", 4, recent=64)}
FILL_CHUNK = 16384


def filled_cache(model, kv_quant, context: int) -> list:
    """The model's caches holding `context` random tokens (N(0, 1) keys and values, as after k/v norms)."""
    cache = model.make_cache(kv_quant=kv_quant)
    owners = model.config.layers[: model.config.first_kv_shared_layer]
    for spec, layer_cache in zip(owners, cache):
        shape = (1, spec.num_kv_heads, 0, spec.head_dim)
        if spec.is_sliding:  # only the ring's worth matters; the positions say the rest came before
            length = layer_cache.capacity
            layer_cache.offset = context - length
            if getattr(layer_cache, "recent", None) is not None:
                layer_cache.recent.offset = context - length
        else:
            length = context
        for start in range(0, length, FILL_CHUNK):
            n = min(FILL_CHUNK, length - start)
            kv = mx.random.normal((shape[0], shape[1], n, shape[3])).astype(mx.bfloat16)
            mx.eval(layer_cache.update_and_fetch(kv, kv))
    return cache


def decode_rate(model, cache, steps: int, warmup: int = 2) -> float:
    """Tokens a second over `steps` pipelined greedy decode steps (after `warmup` of them)."""

    def step(token):
        next_token = mx.argmax(model(token, cache=cache)[:, -1, :], axis=-1)[:, None]
        mx.async_eval(next_token)
        return next_token

    token = step(mx.array([[1]], mx.int32))
    for _ in range(warmup):
        token = step(token)
    token.item()
    start = time.perf_counter()
    for _ in range(steps):
        next_token = step(token)
        token.item()  # the previous step's token, read while this step runs (as generation does)
        token = next_token
    token.item()
    return steps / (time.perf_counter() - start)


def measure(model, context: int, steps: int, rounds: int) -> dict:
    """One row: each cache's median rate over `rounds` alternated rounds, its KV bytes, the ratios."""
    caches = {name: filled_cache(model, kv_quant, context) for name, kv_quant in CACHES.items()}
    rates = {name: [] for name in CACHES}
    for _ in range(rounds):
        for name, cache in caches.items():
            rates[name].append(decode_rate(model, cache, steps))
    row = {name: {"decode_tps": median(rates[name]), "rounds_tps": rates[name],
                  "kv_bytes": sum(c.nbytes for c in caches[name])} for name in CACHES}
    bf16 = rates["bf16"]
    for key, name in (("speed", "TurboQuant 4/4"), ("recent_speed", "TurboQuant 4/4 + recent 64")):
        per_round = [q / b for q, b in zip(rates[name], bf16)]
        row[f"{key}_ratio"] = row[name]["decode_tps"] / row["bf16"]["decode_tps"]
        row[f"{key}_ratio_range"] = [min(per_round), max(per_round)]
    row["memory_ratio"] = row["bf16"]["kv_bytes"] / row["TurboQuant 4/4"]["kv_bytes"]
    return row


def write(out: Path, meta: dict, results: list, command: str):
    """The JSON and the markdown table, rewritten after every row (a cut-off run keeps its rows)."""
    (out / "kv_quant_speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [
        f"# Decode with a TurboQuant 4/4 KV cache vs bf16 ({meta['device']}, kernels: {meta['backend']}, "
        f"mlx {meta['mlx']})",
        "",
        "Caches filled with random keys/values to the context (no prefill); random 4-bit weights; pipelined "
        f"greedy decode as in generation (async_eval of the next step before reading a token); {meta['rounds']} "
        f"alternated rounds of {meta['steps']} steps per cache, median tok/s, [min, max] of the per-round "
        "ratios. KV memory = bytes of the cache arrays (capacity, as allocated).",
        "",
        "| preset | context | bf16 tok/s | TQ 4/4 tok/s | TQ / bf16 | TQ 4/4 + recent 64 tok/s | / bf16 "
        "| bf16 KV GiB | TQ 4/4 KV GiB | KV ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, t, w = r["bf16"], r["TurboQuant 4/4"], r["TurboQuant 4/4 + recent 64"]
        spread = "[{:.2f}, {:.2f}]".format(*r["speed_ratio_range"])
        recent_spread = "[{:.2f}, {:.2f}]".format(*r["recent_speed_ratio_range"])
        lines.append(f"| {r['preset']} | {r['context'] // 1024}K | {b['decode_tps']:.1f} | {t['decode_tps']:.1f} | "
                     f"{r['speed_ratio']:.2f}× {spread} | {w['decode_tps']:.1f} | {r['recent_speed_ratio']:.2f}× "
                     f"{recent_spread} | {b['kv_bytes'] / 2**30:.2f} | {t['kv_bytes'] / 2**30:.2f} | "
                     f"{r['memory_ratio']:.2f}× |")
    lines += ["", f"`{command}`", ""]
    (out / "kv_quant_speed.md").write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for kv_quant_speed.json and .md")
    parser.add_argument("--presets", nargs="+", default=["E2B", "31B"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps a round")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per cache")
    args = parser.parse_args()
    if args.rounds * (args.steps + 3) > GROWTH_STEP:
        raise SystemExit(f"--rounds x (--steps + 3) must stay within {GROWTH_STEP} decode steps (one cache growth)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = mx.device_info().get("device_name", str(mx.default_device())) if hasattr(mx, "device_info") else str(mx.default_device())
    meta = {"device": device, "backend": backend(), "mlx": mx.__version__, "python": platform.python_version(),
            "steps": args.steps, "rounds": args.rounds, "weights": "random, affine 4-bit g64",
            "fill": "random keys/values, no prefill"}
    command = "python -m benchmarks.kv_quant_speed " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items())
    results = []
    for preset in args.presets:
        model = random_model(preset, bits=4)
        for context in args.contexts:
            row = {"preset": preset, "context": context, **measure(model, context, args.steps, args.rounds)}
            results.append(row)
            print(json.dumps(row), flush=True)
            write(out, meta, results, command)
            mx.clear_cache()
        del model
        mx.clear_cache()


if __name__ == "__main__":
    main()
