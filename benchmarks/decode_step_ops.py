"""Ops of one decode step as a GPU backend builds it: per step, per layer kind and per part of a layer,
ours vs mlx-lm's Gemma 4, and the fastest graph-build time.

On the CPU MLX's fast ops (`mx.fast.rms_norm`, `rope`, `layer_norm`, `scaled_dot_product_attention`) run
their fallback: ~9 elementwise ops per RMSNorm, ~15 per RoPE. On a GPU each is one primitive. Counting
on the CPU as is would put ~2700 phantom ops in an E2B step, so here every fast op is stood in by one
node too (as kv_quant_step_ops.py stands in our kernels), and the graph is the one a GPU would run.

    python -m benchmarks.decode_step_ops --out benchmarks/results/decode_step_ops.md
"""

import argparse
import cProfile
import gc
import pstats
import re
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, contextmanager

import mlx.core as mx
import mlx.nn as nn

from mlx_gemma4 import cache as caches
from mlx_gemma4.model import layers as our_layers, moe as our_moe, text as our_text
from mlx_gemma4.model.fused import fuse_projections

from .kv_quant_speed import filled_cache
from .kv_quant_step_ops import STAND_IN, VIEWS, _placeholder, gpu_path, shrunk_model
from .pair import mlx_lm_twin

FAST_OPS = ("rms_norm", "rope", "layer_norm", "scaled_dot_product_attention")
FAST_MARK = "ErfInv"  # follows the Depends of a fast op's stand-in; no Gemma model uses erfinv


def _fast_stand_in(x, *args, **kwargs):
    """A fast op as the GPU builds it: one node on all its array inputs (Depends), marked."""
    inputs = [x] + [a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)]
    return mx.erfinv(mx.depends([_placeholder(tuple(x.shape), x.dtype)], inputs)[0])


@contextmanager
def gpu_graph():
    """Our kernels and MLX's fast ops each build one node, as on a GPU."""
    saved = {name: getattr(mx.fast, name) for name in FAST_OPS}
    for name in FAST_OPS:
        setattr(mx.fast, name, _fast_stand_in)
    try:
        with gpu_path():
            yield
    finally:
        for name, op in saved.items():
            setattr(mx.fast, name, op)


def graph_ops(outputs) -> Counter:
    """Primitive labels in the not yet evaluated graph of `outputs`."""
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as dot:
        mx.export_to_dot(dot.name, outputs)
        return Counter(re.findall(r'label ="([A-Za-z]+)"', dot.read()))


def kinds(labels: Counter) -> dict:
    """Labels as our kernels, fast ops, other MLX compute ops, launches (the three) and views."""
    fast = labels[FAST_MARK]
    kernels = labels[STAND_IN] - fast
    views = sum(n for label, n in labels.items() if label in VIEWS)
    mlx = sum(labels.values()) - views - kernels - 2 * fast
    return {"kernels": kernels, "fast": fast, "mlx": mlx, "launches": kernels + fast + mlx, "views": views}


def _arrays(tree) -> list:
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [a for item in tree for a in _arrays(item)]
    if isinstance(tree, dict):
        return [a for item in tree.values() for a in _arrays(item)]
    return []


LAYER = "layer glue (residuals, PLE gate, layer scalar)"
LAYER_START = "layer start"
# The parts a decoder layer is attributed to: (owner, attribute, label). A part's own ops are those
# between its evaluated inputs and its outputs, less its sub-parts' (whose outputs are evaluated too).
PARTS = (
    (nn.Linear, "__call__", "projections (matmuls)"),
    (our_layers.RMSNorm, "__call__", "norms"),
    (our_layers.RoPE, "__call__", "RoPE"),
    (our_layers.MLP, "__call__", "MLP (GeGLU)"),
    (our_moe.Router, "__call__", "MoE router"),
    (our_moe.Experts, "__call__", "MoE experts"),
    (caches.FullCache, "update_and_fetch", "KV cache update"),
    (caches.SlidingCache, "update_and_fetch", "KV cache update"),
    (our_text, "scaled_dot_product_attention", "attention"),
    (our_text, "rms_norm_no_scale", "norms"),
    (our_text.Attention, "__call__", "attention glue (reshape, transpose)"),
    (our_text.DecoderLayer, "__call__", LAYER),
)


@contextmanager
def attributed(tally: list):
    """Each call of a part appends [label, its own ops] to `tally` as it returns. Its own ops: those of its
    outputs' graph once its inputs and its sub-parts' outputs are evaluated, plus what it builds between
    sub-parts (the pending graph of a sub-part's inputs is credited to the part that calls it)."""
    active = []

    def wrap(call, label):
        def counted(*args, **kwargs):
            inputs = _arrays((args, kwargs))
            if active:
                active[-1][1].update(graph_ops(inputs))
            mx.eval(inputs)
            if label == LAYER:
                tally.append([LAYER_START, None])
            active.append([label, Counter()])
            try:
                out = call(*args, **kwargs)
            finally:
                record = active.pop()
            record[1].update(graph_ops(_arrays(out)))
            mx.eval(_arrays(out))
            tally.append(record)
            return out

        return counted

    with ExitStack() as stack:
        for owner, name, label in PARTS:
            original = getattr(owner, name)
            setattr(owner, name, wrap(original, label))
            stack.callback(setattr, owner, name, original)
        yield


def layer_kind(spec) -> str:
    return ("sliding" if spec.is_sliding else "global") + (" KV reader" if not spec.owns_kv else "")


def layer_parts(model, cache) -> dict:
    """{layer kind: {part: launches of its own}} for the first layer of each kind, and the layers per kind."""
    tally = []
    mx.eval(model(mx.array([[1]], mx.int32), cache=cache))  # a typical step: not the one that grows a cache
    with attributed(tally):
        model(mx.array([[1]], mx.int32), cache=cache)
    # A decoder layer's parts lie between its start mark and its own entry.
    layers, current = [], None
    for label, labels in tally:
        if label == LAYER_START:
            current = []
        elif current is not None:
            current.append((label, labels))
        if label == LAYER:
            layers.append(current)
            current = None
    out, counts = {}, Counter(layer_kind(spec) for spec in model.config.layers)
    for spec, parts in zip(model.config.layers, layers):
        kind = layer_kind(spec)
        if kind in out:
            continue
        sums = Counter()
        for label, labels in parts:
            sums[label] += kinds(labels)["launches"]
        out[kind] = dict(sums)
    return out, counts


def step(model, cache) -> dict:
    """Ops of one whole decode step (after a warm-up step)."""
    token = mx.array([[1]], mx.int32)
    mx.eval(model(token, cache=cache))  # past any first-use work
    logits = model(token, cache=cache)
    ops = kinds(graph_ops(logits))
    mx.eval(logits)
    return ops


def build_ms(steps: dict, repeats: int) -> dict:
    """{name: fastest graph build of one decode step, ms} for `steps` {name: (model, cache)}: host only, no
    evaluation. The builds are interleaved, so that every model sees the same load on a shared host, and
    timed in this thread's CPU time with the garbage collector held off (a collection lands on whichever
    build happens to allocate when it is due)."""
    token = mx.array([[1]], mx.int32)
    for model, cache in steps.values():
        mx.eval(model(token, cache=cache))  # past any first-use work
    best = dict.fromkeys(steps, float("inf"))
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, (model, cache) in steps.items():
                start = time.thread_time_ns()
                logits = model(token, cache=cache)
                best[name] = min(best[name], (time.thread_time_ns() - start) / 1e6)
                mx.eval(logits)
    finally:
        gc.enable()
    return best


def profile(model, cache, top: int):
    """cProfile's `top` functions by own time over 20 step builds (evaluation outside the profile)."""
    token = mx.array([[1]], mx.int32)
    profiler = cProfile.Profile()
    for _ in range(20):
        profiler.enable()
        logits = model(token, cache=cache)
        profiler.disable()
        mx.eval(logits)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def mlx_lm_filled_cache(theirs, context: int) -> list:
    """mlx-lm's caches of its model holding `context` random tokens (its rings hold their window)."""
    cache = theirs.make_cache()
    for index, layer_cache in enumerate(cache):
        attention = theirs.model.layers[index].self_attn
        shape = (1, attention.n_kv_heads, 0, attention.head_dim)
        length = min(context, getattr(layer_cache, "max_size", context))
        for start in range(0, length, 512):
            n = min(512, length - start)
            kv = mx.random.normal((shape[0], shape[1], n, shape[3])).astype(attention.o_proj.weight.dtype)
            mx.eval(layer_cache.update_and_fetch(kv, kv))
    return cache


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="markdown file for the tables")
    parser.add_argument("--presets", nargs="+", default=["E2B", "31B", "26B-A4B"])
    parser.add_argument("--context", type=int, default=4096, help="cached tokens (rings wrapped)")
    parser.add_argument("--repeats", type=int, default=100, help="interleaved builds of each model's step")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print our step's N costliest functions")
    args = parser.parse_args()
    steps, parts = [], {}
    with gpu_graph():
        for preset in args.presets:
            model = fuse_projections(shrunk_model(preset))  # as load_model and random_model leave it
            theirs = mlx_lm_twin(model)
            name = "mlx-lm"
            if model.config.enable_moe_block:  # MLX's CPU gather_mm takes float32 only
                theirs.set_dtype(mx.float32)
                name = "mlx-lm (float32)"
            caches = {"ours": filled_cache(model, None, args.context),
                      name: mlx_lm_filled_cache(theirs, args.context)}
            ours_ops, their_ops = step(model, caches["ours"]), step(theirs, caches[name])
            build = build_ms({"ours": (model, caches["ours"]), name: (theirs, caches[name])}, args.repeats)
            ours_ops["build_ms"], their_ops["build_ms"] = build["ours"], build[name]
            steps += [(preset, model.config.num_hidden_layers, "ours", ours_ops, build["ours"] / build[name]),
                      (preset, model.config.num_hidden_layers, name, their_ops, 1.0)]
            parts[preset] = layer_parts(model, filled_cache(model, None, args.context))
            print(preset, "ours", ours_ops, name, their_ops, flush=True)
            if args.profile:
                profile(model, caches["ours"], args.profile)
    lines = [
        "# One decode step's ops as a GPU builds them",
        "",
        f"Preset layer structures (hidden size and vocabulary shrunk; the op count does not depend on them), "
        f"bf16 weights and KV cache, {args.context} cached tokens. Our kernels and MLX's fast ops stood in by one "
        "node each, as a GPU builds them. Launches: our kernels + fast ops + other MLX compute ops; views "
        f"(reshape, transpose, slice, broadcast) launch nothing. Build: fastest of {args.repeats} graph builds, "
        "ours and mlx-lm's interleaved in one process, CPU time of the building thread with garbage collection "
        f"held off: Python and MLX graph construction only, on this host ({mx.default_device()}).",
        "",
        "| preset | layers | model | our kernels | fast ops | other MLX ops | launches | launches / layer | "
        "views | build ms | build vs mlx-lm |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset, layers, name, c, ratio in steps:
        lines.append(f"| {preset} | {layers} | {name} | {c['kernels']} | {c['fast']} | {c['mlx']} | {c['launches']} | "
                     f"{c['launches'] / layers:.1f} | {c['views']} | {c['build_ms']:.2f} | {ratio:.2f}x |")
    lines += ["", "## Launches of one decoder layer, by part (ours)", ""]
    for preset, (by_kind, counts) in parts.items():
        labels = list(dict.fromkeys(label for kind in by_kind.values() for label in kind))
        lines += [f"{preset}:", "", "| part | " + " | ".join(f"{k} (x{counts[k]})" for k in by_kind) + " |",
                  "|---|" + "---|" * len(by_kind)]
        for label in labels:
            lines.append(f"| {label} | " + " | ".join(str(kind.get(label, 0)) for kind in by_kind.values()) + " |")
        lines.append("| **layer** | " + " | ".join(str(sum(kind.values())) for kind in by_kind.values()) + " |")
        lines.append("")
    lines += [f"`python -m benchmarks.decode_step_ops --out {args.out}`", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
