"""Per-vector distortion of the bundled model's real cached keys and values under each KV codec.

Checks the codec on the vectors it actually gets (qk-normed, RoPE'd keys; v-normed values; head dims
32 and 64): E‖x - x̃‖²/‖x‖² against the Lloyd-Max codebook's prediction for a uniformly random
direction, and against MLX affine quantization at the same bits. Also how much of the keys' energy
is a mean shared by all tokens (softmax ignores it, the quantizer does not).

    python -m benchmarks.kv_quant_distortion --out benchmarks/results/kv_quant_distortion_bundled.md
"""

import argparse
from pathlib import Path

import mlx.core as mx

from mlx_gemma4 import load
from mlx_gemma4.quantized_cache import AffineCodec, KVQuantConfig

from .kv_quant_quality import CHUNK, documents


def relative_error(x: mx.array, decoded: mx.array) -> float:
    return mx.mean(mx.sum((decoded - x) ** 2, axis=-1) / mx.sum(x * x, axis=-1)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/kv_quant_distortion_bundled.md")
    args = parser.parse_args()
    model, tokenizer = load()
    model.set_dtype(mx.float32)
    ids = mx.array(documents(tokenizer, 1024)[0][None], mx.int32)
    cache = model.make_cache()
    for start in range(0, ids.shape[1], CHUNK):
        model(ids[:, start : start + CHUNK], cache=cache)
    rows = []
    for layer, layer_cache in enumerate(cache):
        for kind, x in (("K", layer_cache.state[0]), ("V", layer_cache.state[1])):
            x = x.astype(mx.float32)
            dim = x.shape[-1]
            shared = mx.sum(mx.mean(x, axis=2) ** 2).item() / mx.mean(mx.sum(x * x, axis=-1), axis=-1).sum().item()
            for bits in (4, 3):
                codec = KVQuantConfig("turboquant", bits).codecs(layer, dim)[kind == "V"]
                affine = AffineCodec(dim, bits, min(64, dim))
                rows.append(f"| {layer} | {kind} | {dim} | {bits} | {relative_error(x, codec.decode(codec.encode(x))):.5f} | "
                            f"{codec.unit_mse:.5f} | {relative_error(x, affine.decode(affine.encode(x))):.5f} | {shared:.2f} |")
    table = "\n".join(rows)
    Path(args.out).write_text(f"""# KV codec distortion on the bundled model's cached vectors

One {ids.shape[1]}-token docstring text, float32; each owning layer's cache (sliding layers: the ring).
Relative error = mean over (token, head) of ‖x - x̃‖²/‖x‖². "codebook" = the Lloyd-Max prediction
E‖u - ũ‖² for a random unit direction at that head dim (the stored norm is the exact-norm
correction, which moves the measured value a few percent either way). Affine: MLX affine quantization, group min(64, head dim), float32
scale and bias (6 bits a coordinate at 4 bits on 32-wide heads, vs TurboQuant's 5). "shared" =
‖mean over tokens‖² / mean ‖x‖²: the part of the keys that is the same for every token.

| layer | K/V | head dim | bits | TurboQuant | codebook | affine | shared |
|---|---|---|---|---|---|---|---|
{table}

`python -m benchmarks.kv_quant_distortion --out {args.out}`
""")


if __name__ == "__main__":
    main()
