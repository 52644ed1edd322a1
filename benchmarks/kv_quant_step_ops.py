"""Host cost of one decode step with a TurboQuant KV cache vs bf16: graph ops and graph-build time.

On the CUDA backend a decode step is host-bound (every MLX op costs several µs to build and launch),
so the number of ops a step adds matters more than the kernels' FLOPs. This builds one decode step
of a preset's layer structure (every layer kind: sliding rings, global layers, KV-shared readers)
on the CPU with the GPU path's code: the kernels are stood in by one placeholder op each, so the
graph is the one a GPU would run. Hidden size and vocabulary are shrunk (the op count does not
depend on them); heads, head dims, kv heads, windows and layer pattern are the preset's.

    python -m benchmarks.kv_quant_step_ops --out benchmarks/results/kv_quant_step_ops.md
"""

import argparse
import importlib
import re
import tempfile
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import mlx.core as mx

from mlx_gemma4.config import TextConfig
from mlx_gemma4.kernels import head_norm_rope, moe_experts, moe_router, residual_norm, sdpa, tq_attention, tq_encode
from mlx_gemma4.model import Model
from mlx_gemma4.presets import PRESETS

from .kv_quant_speed import CACHES, filled_cache

# (hidden 128 and 32 experts: the smallest the MoE router kernel takes, so its GPU path is the one counted)
SHRUNK = dict(hidden_size=128, intermediate_size=64, vocab_size=512, vocab_size_per_layer_input=512,
              moe_intermediate_size=16, num_experts=32, top_k_experts=2)
# ops that only re-describe memory (no kernel launch on a GPU); counted apart
VIEWS = {"Broadcast", "Reshape", "Slice", "Split", "Squeeze", "ExpandDims", "Transpose", "View", "Unflatten", "Flatten",
         "AsStrided"}
STAND_IN = "Depends"  # one of our kernels (stand_in)
# (the package exports a function named decode_attention, hence the lookup by module name)
KERNEL_MODULES = (importlib.import_module("mlx_gemma4.kernels.decode_attention"), sdpa, tq_attention, tq_encode,
                  moe_router, moe_experts, residual_norm, head_norm_rope)


@lru_cache(maxsize=None)
def _placeholder(shape: tuple, dtype) -> mx.array:
    out = mx.zeros(shape, dtype)
    mx.eval(out)
    return out


def stand_in(kernel, *, inputs, output_shapes, output_dtypes, **_) -> list:
    """A kernel call as one graph node that consumes its inputs (Depends) and yields zeros."""
    return mx.depends([_placeholder(tuple(s), d) for s, d in zip(output_shapes, output_dtypes)], list(inputs))


@contextmanager
def gpu_path():
    """Route every kernel dispatch to `stand_in`, as if a GPU backend had passed its probes."""
    saved = [(m, name, getattr(m, name)) for m in KERNEL_MODULES for name in ("backend", "launcher", "usable")
             if hasattr(m, name)]
    for module, name, _ in saved:
        setattr(module, name, {"backend": lambda: "cuda", "launcher": lambda on: stand_in,
                               "usable": lambda key, probe: True}[name])
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def shrunk_model(preset: str) -> Model:
    model = Model(TextConfig(**{**PRESETS[preset], **SHRUNK}))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    return model


def graph_ops(outputs) -> dict:
    """Primitive ops in the graph of `outputs` not yet evaluated: our kernels, other computing ops
    (MLX's), and views."""
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as dot:
        mx.export_to_dot(dot.name, outputs)
        labels = re.findall(r'label ="([A-Za-z]+)"', dot.read())
    kernels, views = labels.count(STAND_IN), sum(label in VIEWS for label in labels)
    return {"kernels": kernels, "mlx": len(labels) - kernels - views, "views": views}


def step_cost(model, kv_quant, context: int, repeats: int) -> dict:
    """Ops of one decode step and the fastest of `repeats` builds of its graph (host only, no evaluation;
    the fastest is the one least disturbed by other processes)."""
    cache = filled_cache(model, kv_quant, context)
    token = mx.array([[1]], mx.int32)
    mx.eval(model(token, cache=cache))  # past any first-use work
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits = model(token, cache=cache)
        times.append(time.perf_counter() - start)
        ops = graph_ops(logits)
        mx.eval(logits)
    return {**ops, "build_ms": 1e3 * min(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="markdown file for the table")
    parser.add_argument("--presets", nargs="+", default=["E2B", "31B"])
    parser.add_argument("--context", type=int, default=4096, help="cached tokens (rings wrapped)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rows = []
    with gpu_path():
        for preset in args.presets:
            model = shrunk_model(preset)
            layers = model.config.num_hidden_layers
            for name, kv_quant in CACHES.items():
                cost = step_cost(model, kv_quant, args.context, args.repeats)
                rows.append((preset, layers, name, cost))
                print(preset, name, cost, flush=True)
    lines = [
        "# One decode step's host cost: graph ops and graph-build time (GPU code path, CPU host)",
        "",
        f"Preset layer structures (hidden size and vocabulary shrunk), {args.context} cached tokens, kernels stood in "
        "by one op each. Our kernels and MLX's computing ops each launch work on a GPU; views only re-describe "
        "memory. Build time: fastest of "
        f"{args.repeats} steps, Python and MLX graph construction only ({mx.default_device()}).",
        "",
        "| preset | layers | KV cache | our kernels | MLX compute ops | launches | view ops | build ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, layers, name, c in rows:
        lines.append(f"| {preset} | {layers} | {name} | {c['kernels']} | {c['mlx']} | {c['kernels'] + c['mlx']} | "
                     f"{c['views']} | {c['build_ms']:.2f} |")
    lines += ["", f"`python -m benchmarks.kv_quant_step_ops --out {args.out}`", ""]
    Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()
