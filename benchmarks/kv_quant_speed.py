"""Decode speed and KV memory with TurboQuant 4/4 (also with a 64-token full-precision recent
window) vs the bf16 KV cache, on real-size presets.

The caches are filled with random keys/values to the context length instead of prefilling (a 128K
prefill of 31B would take most of the GPU budget); decode then runs the whole model, every layer
attending over the filled cache (our decode kernels on a GPU: decode_attention for bf16,
tq_attention for TurboQuant). Random 4-bit weights (presets.random_model): speed only, no quality.

    python -m benchmarks.kv_quant_speed --out benchmarks/results/kv_quant_speed
    python -m benchmarks.kv_quant_speed --presets E2B --contexts 8192 --steps 4   # a quick look
"""

import argparse
import json
import platform
import time
from pathlib import Path

import mlx.core as mx

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
    token = mx.array([[1]], mx.int32)
    for _ in range(warmup):
        mx.eval(model(token, cache=cache))
    start = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(token, cache=cache))
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for kv_quant_speed.json and .md")
    parser.add_argument("--presets", nargs="+", default=["E2B", "31B"])
    parser.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = mx.device_info().get("device_name", str(mx.default_device())) if hasattr(mx, "device_info") else str(mx.default_device())
    results = []
    for preset in args.presets:
        model = random_model(preset, bits=4)
        for context in args.contexts:
            row = {"preset": preset, "context": context}
            for name, kv_quant in CACHES.items():
                cache = filled_cache(model, kv_quant, context)
                row[name] = {"decode_tps": decode_rate(model, cache, args.steps),
                             "kv_bytes": sum(c.nbytes for c in cache)}
                del cache
                mx.clear_cache()
            row["speed_ratio"] = row["TurboQuant 4/4"]["decode_tps"] / row["bf16"]["decode_tps"]
            row["memory_ratio"] = row["bf16"]["kv_bytes"] / row["TurboQuant 4/4"]["kv_bytes"]
            row["recent_speed_ratio"] = row["TurboQuant 4/4 + recent 64"]["decode_tps"] / row["bf16"]["decode_tps"]
            results.append(row)
            print(json.dumps(row), flush=True)
        del model
        mx.clear_cache()
    meta = {"device": device, "backend": backend(), "mlx": mx.__version__, "python": platform.python_version(),
            "steps": args.steps, "weights": "random, affine 4-bit g64", "fill": "random keys/values, no prefill"}
    (out / "kv_quant_speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [
        f"# Decode with a TurboQuant 4/4 KV cache vs bf16 ({device}, kernels: {backend()}, mlx {mx.__version__})",
        "",
        "Caches filled with random keys/values to the context (no prefill); random 4-bit weights; "
        f"{args.steps} timed decode steps after 2 warm-up steps. KV memory = bytes of the cache arrays "
        "(capacity, as allocated).",
        "",
        "| preset | context | bf16 tok/s | TQ 4/4 tok/s | TQ / bf16 | TQ 4/4 + recent 64 tok/s | / bf16 "
        "| bf16 KV GiB | TQ 4/4 KV GiB | KV ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b, t, w = r["bf16"], r["TurboQuant 4/4"], r["TurboQuant 4/4 + recent 64"]
        lines.append(f"| {r['preset']} | {r['context'] // 1024}K | {b['decode_tps']:.1f} | {t['decode_tps']:.1f} | "
                     f"{r['speed_ratio']:.2f}× | {w['decode_tps']:.1f} | {r['recent_speed_ratio']:.2f}× | "
                     f"{b['kv_bytes'] / 2**30:.2f} | {t['kv_bytes'] / 2**30:.2f} | {r['memory_ratio']:.2f}× |")
    lines += ["", f"`python -m benchmarks.kv_quant_speed --out {args.out}`", ""]
    (out / "kv_quant_speed.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
