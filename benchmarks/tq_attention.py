"""One layer's decode-step attention cost on the GPU: TurboQuant 4/4 codes against the bf16 cache.

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.tq_attention --out benchmarks/results

Where a TQ decode step loses to bf16 (benchmarks/results/kv_quant_speed.md), per call and per part:
for each Gemma 4 attention layout (E2B and 31B, sliding layers at their window, global layers at 8K to
128K keys) the median µs of
- `bf16 attention`: kernels/decode_attention.py on the bf16 keys and values (the default path);
- `TQ attention`: kernels/tq_attention.py on packed 4-bit rows (both of its passes);
- `TQ encode`: kernels/tq_encode.py on one token's keys and on its values (what appending costs;
  the bf16 cache writes its row with no arithmetic).
Each timing is the median over trials of a batch of independent calls evaluated together, divided by
the calls (benchmarks/attention.py's method): GPU time plus the launch, not the Python around it.
Writes tq_attention.json and tq_attention.md.
"""

import argparse
import json
import warnings
from pathlib import Path

import mlx.core as mx

from benchmarks.attention import device_name, seconds_per_call
from mlx_gemma4.kernels import KernelFallbackWarning, backend, decode_attention
from mlx_gemma4.kernels.tq_attention import tq_attention
from mlx_gemma4.turboquant.codec import TurboQuantCodec

LAYOUTS = {  # layer: (head_dim, query heads, kv heads, window or None)
    "E2B sliding": (256, 8, 1, 512),
    "E2B global": (512, 8, 1, None),
    "31B sliding": (256, 32, 16, 1024),
    "31B global": (512, 32, 4, None),
}
CONTEXTS = [8192, 32768, 131072]
CALLS = 16
BITS = 4


def measure(layer: str, keys_count: int) -> dict:
    dim, heads, kv_heads, _ = LAYOUTS[layer]
    rng = mx.random.split(mx.random.key(keys_count + heads), 3 + CALLS)
    keys = mx.random.normal((1, kv_heads, keys_count, dim), key=rng[0]).astype(mx.bfloat16)
    values = mx.random.normal((1, kv_heads, keys_count, dim), key=rng[1]).astype(mx.bfloat16)
    queries = [mx.random.normal((1, heads, 1, dim), key=k).astype(mx.bfloat16) * dim**-0.25 for k in rng[3:]]
    k_codec, v_codec = TurboQuantCodec(dim, BITS, seed=1), TurboQuantCodec(dim, BITS, seed=2)
    k_rows, v_rows = k_codec.encode(keys), v_codec.encode(values)
    new_rows = [mx.random.normal((1, kv_heads, 1, dim), key=k).astype(mx.bfloat16) for k in mx.random.split(rng[2], CALLS)]
    mx.eval(keys, values, queries, k_rows, v_rows, new_rows)

    def bf16(q, k, v):
        return decode_attention(q, k, v, 1.0)

    def tq(q, k, v):
        return tq_attention(q, k, v, k_codec, v_codec, 1.0)

    def encode(rows, *_):
        return k_codec.encode(rows)

    bf16_s = seconds_per_call(bf16, queries, keys, values)
    tq_s = seconds_per_call(tq, queries, k_rows, v_rows)
    encode_s = seconds_per_call(encode, new_rows, None, None)
    return dict(
        layer=layer, head_dim=dim, heads=heads, kv_heads=kv_heads, keys=keys_count,
        bf16_us=round(bf16_s * 1e6, 1), tq_us=round(tq_s * 1e6, 1), encode_us=round(encode_s * 1e6, 1),
        tq_step_over_bf16=round((tq_s + 2 * encode_s) / bf16_s, 2),
        bf16_gb_per_s=round((keys.nbytes + values.nbytes) / bf16_s / 1e9),
        tq_gb_per_s=round((k_rows.nbytes + v_rows.nbytes) / tq_s / 1e9),
    )


def markdown(result: dict) -> str:
    lines = [
        f"# One layer's decode attention: TurboQuant {BITS}/{BITS} codes vs the bf16 cache ({result['device']}, "
        f"kernels: {result['backend']}, mlx {result['mlx']})",
        "",
        "µs per call (median over trials of a batch of independent calls, divided by the calls). `TQ step / bf16`: "
        "(TQ attention + two encodes) / bf16 attention, the layer's share of a decode step's difference. "
        "GB/s: the cache bytes each kernel reads. `python -m benchmarks.tq_attention`.",
        "",
        "| layer | keys | bf16 attention µs | TQ attention µs | TQ encode µs (one row) | TQ step / bf16 "
        "| bf16 GB/s | TQ GB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['layer']} | {r['keys']} | {r['bf16_us']} | {r['tq_us']} | {r['encode_us']} | "
                     f"{r['tq_step_over_bf16']}× | {r['bf16_gb_per_s']} | {r['tq_gb_per_s']} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for tq_attention.json/.md")
    parser.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS, help="global layers' key counts")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS), metavar="LAYOUT",
                        help=f"layers to time (default all: {', '.join(LAYOUTS)})")
    args = parser.parse_args()
    if backend() == "reference":
        raise SystemExit("no GPU backend: run on a GPU (MLX_GEMMA4_KERNELS=cuda or metal)")
    warnings.simplefilter("error", KernelFallbackWarning)  # a configuration that fell back is no measurement
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(device=device_name(), backend=backend(), mlx=mx.__version__, rows=[])
    for layer in args.layouts:
        window = LAYOUTS[layer][3]
        for keys_count in [window] if window else args.contexts:
            result["rows"].append(measure(layer, keys_count))
            print(result["rows"][-1], flush=True)
            (args.out / "tq_attention.json").write_text(json.dumps(result, indent=1))
            (args.out / "tq_attention.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
