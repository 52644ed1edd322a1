"""The vision tower at real sizes: time and peak memory to encode one image at every token budget.

    python -m benchmarks.vision --out benchmarks/results

Towers with random weights at the real dimensions (E2B/E4B: 16 layers, 768 wide, head_dim 64;
26B/31B: 27 layers, 1152 wide, head_dim 72), bfloat16, one 4:3 image (1024x768 before resizing) as the
processor grids it at each budget (70..1120 soft tokens = up to 10080 patches attended together), tower
plus projection to the text width. Median of 5 runs after a warm-up. Also checks the device against
the CPU in float32 at budget 280 (the largest relative difference of the soft tokens).
Writes vision.json and vision.md under --out.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from transformers.models.gemma4.processing_gemma4 import get_aspect_ratio_preserving_size

from mlx_gemma4.model.gemma4 import IMAGE_BUDGETS, VisionInput
from mlx_gemma4.model.vision import MultimodalEmbedder, VisionConfig, VisionTower

SIZES = {
    "E2B/E4B": (dict(), 2560),  # transformers' Gemma4VisionConfig defaults are the E2B/E4B tower
    "26B/31B": (dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                     head_dim=72, intermediate_size=4304, standardize=True), 5376),  # fmt: skip
}
IMAGE = (768, 1024)  # height, width
TRIALS = 5


def build(overrides: dict, text_hidden: int, dtype):
    config = VisionConfig(**overrides)
    tower, embed = VisionTower(config), MultimodalEmbedder(config.hidden_size, text_hidden, config.rms_norm_eps)
    for module in (tower, embed):
        params = nn.utils.tree_flatten(module.parameters())
        module.update(nn.utils.tree_unflatten([(k, (0.02 * mx.random.normal(v.shape)).astype(dtype)) for k, v in params]))
    return config, tower, embed


def image_input(config: VisionConfig, budget: int, seed: int = 0) -> VisionInput:
    height, width = get_aspect_ratio_preserving_size(*IMAGE, config.patch_size, budget * config.pooling_kernel_size**2,
                                                     config.pooling_kernel_size)  # fmt: skip
    rows, cols = height // config.patch_size, width // config.patch_size
    pixels = np.random.default_rng(seed).random((1, rows * cols, 3 * config.patch_size**2), dtype=np.float32)
    return VisionInput(pixels, (rows, cols))


def encode(tower, embed, item: VisionInput, dtype) -> mx.array:
    positions = mx.array(item.positions())[None]
    return embed(tower(mx.array(item.pixels).astype(dtype), positions, item.grid)[0])


def timed(tower, embed, item, dtype) -> tuple[float, float]:
    mx.eval(encode(tower, embed, item, dtype))
    mx.reset_peak_memory()
    times = []
    for _ in range(TRIALS):
        start = time.perf_counter()
        mx.eval(encode(tower, embed, item, dtype))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, mx.get_peak_memory() / 2**30


def device_check(overrides: dict, text_hidden: int) -> float:
    """Largest |device - cpu| / max|cpu| of the soft tokens, float32, budget 280."""
    mx.random.seed(1)
    config, tower, embed = build(overrides, text_hidden, mx.float32)
    item = image_input(config, 280, seed=1)
    out = encode(tower, embed, item, mx.float32)
    with mx.stream(mx.cpu):
        ref = encode(tower, embed, item, mx.float32)
    out, ref = np.array(out), np.array(ref)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (overrides, text_hidden) in SIZES.items():
        mx.random.seed(0)
        config, tower, embed = build(overrides, text_hidden, mx.bfloat16)
        for budget in IMAGE_BUDGETS:
            item = image_input(config, budget)
            ms, peak = timed(tower, embed, item, mx.bfloat16)
            rows.append(dict(tower=name, budget=budget, grid=list(item.grid), patches=item.pixels.shape[1],
                             soft_tokens=item.soft_tokens(config.pooling_kernel_size), ms=round(ms, 2),
                             peak_gib=round(peak, 3)))  # fmt: skip
            print(rows[-1], flush=True)
        del tower, embed
    check = {name: device_check(overrides, hidden) for name, (overrides, hidden) in SIZES.items()}
    result = dict(device=str(mx.default_device()), mlx=mx.__version__, image=IMAGE, rows=rows,
                  float32_device_vs_cpu_rel=check)  # fmt: skip
    (args.out / "vision.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| tower | budget | grid | patches | soft tokens | ms | peak GiB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tower']} | {r['budget']} | {r['grid'][0]}x{r['grid'][1]} | {r['patches']} | {r['soft_tokens']} "
              f"| {r['ms']} | {r['peak_gib']} |" for r in rows]  # fmt: skip
    lines.append(f"\nfloat32, device vs CPU, budget 280 (max abs diff / max abs): {check}")
    (args.out / "vision.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'vision.json'}")


if __name__ == "__main__":
    main()
