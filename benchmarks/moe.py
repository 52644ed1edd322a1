"""The 26B-A4B MoE block on the GPU: ours against mlx-lm's (its gemma4 Router + SwitchGLU experts).

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.moe --out benchmarks/results

The block is what a decoder layer spends on its experts: routing (rms-norm·scale, projection, top-8
of 128, softmax, per-expert scale) and the experts' GeGLU with the weighted combine, at 26B-A4B's
dimensions (hidden 2816, expert width 704), bfloat16 activations, experts affine 4-bit (group 64) and
the router's projection 8-bit, as the converter and mlx-lm write them. The same random weights in
three runs: ours (kernels/moe_router.py and moe_experts.py, through the model's modules), ours
without kernels (MLX_GEMMA4_KERNELS=reference semantics: our fused gate/up gathers) and mlx-lm.
Decode: one token, the median over trials of a batch of independent calls evaluated together,
divided by the calls. Prefill: 512 and 2048 tokens, one call per trial. Writes moe.json and moe.md.
"""

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import gemma4_text

from benchmarks.attention import device_name
from mlx_gemma4.kernels import KernelFallbackWarning, backend
from mlx_gemma4.kernels.moe_experts import reference as experts_reference
from mlx_gemma4.kernels.moe_router import reference as router_reference
from mlx_gemma4.model.moe import Experts, Router, packed
from mlx_gemma4.presets import preset_config

TOKENS = [1, 512, 2048]
DECODE_CALLS = 16
TRIALS = 9


def build(bits: int, group_size: int, seed: int = 0):
    """Our Router/Experts and mlx-lm's, holding the same random weights."""
    config = preset_config("26B-A4B")
    hidden, inner, experts = config.hidden_size, config.moe_intermediate_size, config.num_experts
    mx.random.seed(seed)
    router, ours = Router(hidden, experts, config.top_k_experts, config.rms_norm_eps), Experts(hidden, inner, experts)
    router.update({"scale": mx.random.uniform(0.5, 1.5, (hidden,)).astype(mx.bfloat16),
                   "per_expert_scale": mx.random.uniform(0.5, 1.5, (experts,)).astype(mx.bfloat16)})
    router.proj.weight = (0.02 * mx.random.normal((experts, hidden))).astype(mx.bfloat16)
    for layer in (ours.gate_up_proj, ours.down_proj):
        layer.weight = (0.02 * mx.random.normal(layer.weight.shape)).astype(mx.bfloat16)
        mx.eval(layer.weight)
    nn.quantize(router, 64, 8)
    nn.quantize(ours, group_size, bits)
    mx.eval(router.parameters(), ours.parameters())

    args = gemma4_text.ModelArgs(hidden_size=hidden, num_experts=experts, top_k_experts=config.top_k_experts,
                                 moe_intermediate_size=inner, enable_moe_block=True, rms_norm_eps=config.rms_norm_eps,
                                 num_hidden_layers=1, layer_types=["sliding_attention"])
    their_router, theirs = gemma4_text.Router(args), gemma4_text.Experts(args)
    nn.quantize(their_router, 64, 8)
    nn.quantize(theirs, group_size, bits)
    their_router.update(router.parameters())
    glu = theirs.switch_glu
    for name in ("weight", "scales", "biases"):
        fused = getattr(ours.gate_up_proj, name)
        # Copies, not views: MLX's CUDA gather_qmm has no implementation for strided weights.
        setattr(glu.gate_proj, name, mx.contiguous(fused[:, :inner]))
        setattr(glu.up_proj, name, mx.contiguous(fused[:, inner:]))
        setattr(glu.down_proj, name, getattr(ours.down_proj, name))
    mx.eval(their_router.parameters(), theirs.parameters())
    return (router, ours), (their_router, theirs)


def runners(ours_modules, their_modules) -> dict:
    router, experts = ours_modules
    their_router, theirs = their_modules

    def ours(x):
        return experts(x, *router(x))

    def ours_without_kernels(x):
        indices, weights = router_reference(x, packed(router.proj), router.scale, router.per_expert_scale,
                                            router.top_k, router.eps)
        return experts_reference(x, indices, weights, packed(experts.gate_up_proj), packed(experts.down_proj))

    def mlx_lm(x):
        return theirs(x, *their_router(x))

    return {"ours": ours, "ours without kernels": ours_without_kernels, "mlx-lm": mlx_lm}


def seconds(block, inputs: list) -> float:
    mx.eval(block(inputs[0]))  # build, probe and warm up
    times = []
    for _ in range(TRIALS):
        start = time.perf_counter()
        mx.eval([block(x) for x in inputs])
        times.append((time.perf_counter() - start) / len(inputs))
    return statistics.median(times)


def active_bytes(experts: Experts, router: Router, tokens: int) -> int:
    """Weight bytes one decode token reads: the router and 8 of 128 experts (prefill reads more experts)."""
    expert_bytes = sum(a.nbytes for layer in (experts.gate_up_proj, experts.down_proj) for a in packed(layer).arrays)
    routed = min(128, 8 * tokens)
    return sum(a.nbytes for a in packed(router.proj).arrays) + expert_bytes * routed // 128


def measure(blocks: dict, ours_modules, their_modules, tokens: int) -> dict:
    hidden = ours_modules[1].gate_up_proj.weight.shape[-1] * 32 // ours_modules[1].gate_up_proj.bits
    calls = DECODE_CALLS if tokens == 1 else 1
    keys = mx.random.split(mx.random.key(tokens), calls)
    inputs = [mx.random.normal((1, tokens, hidden), key=k).astype(mx.bfloat16) for k in keys]
    mx.eval(inputs)
    row = dict(tokens=tokens, **agreement(ours_modules, their_modules, inputs[0]))
    for name, block in blocks.items():
        row[f"{name} us"] = round(seconds(block, inputs) * 1e6, 1)
    row["ours / mlx-lm speedup"] = round(row["mlx-lm us"] / row["ours us"], 2)
    row["ours tok/s"] = round(tokens / row["ours us"] * 1e6, 1)
    row["mlx-lm tok/s"] = round(tokens / row["mlx-lm us"] * 1e6, 1)
    if tokens == 1:
        nbytes = active_bytes(ours_modules[1], ours_modules[0], tokens)
        row["ours GB/s"] = round(nbytes / row["ours us"] / 1e3, 1)
        row["mlx-lm GB/s"] = round(nbytes / row["mlx-lm us"] / 1e3, 1)
    return row


def agreement(ours_modules, their_modules, x) -> dict:
    """How far ours is from mlx-lm: the share of (token, expert) choices the routers agree on (bfloat16
    logits tie at times, and the two break ties differently), and the experts' output given the same
    routing (mlx-lm's), relative to its largest value."""
    (router, experts), (their_router, theirs) = ours_modules, their_modules
    indices, weights = their_router(x)
    ours_indices, _ = router(x)
    chosen = (mx.sort(ours_indices.astype(mx.uint32), -1) == mx.sort(indices.astype(mx.uint32), -1)).mean().item()
    want = theirs(x, indices, weights).astype(mx.float32)
    got = experts(x, indices.astype(mx.uint32), weights.astype(mx.float32)).astype(mx.float32)
    return dict(routing_agreement=round(chosen, 4),
                experts_max_rel_diff=round(mx.abs(got - want).max().item() / mx.abs(want).max().item(), 5))


def markdown(result: dict) -> str:
    lines = [
        f"# 26B-A4B MoE block: ours vs mlx-lm ({result['device']}, mlx {result['mlx']})",
        "",
        f"Router (8-bit) + 128 experts top-8, hidden 2816, width 704, experts {result['bits']}-bit group "
        f"{result['group_size']}, bfloat16; µs per block call (decode: median of batches of {DECODE_CALLS} "
        "independent calls). GB/s: the router's and 8 experts' weight bytes over the time.",
        f"`{result['command']}`",
        "",
        "| tokens | ours µs | ours without kernels µs | mlx-lm µs | ours / mlx-lm | ours GB/s | mlx-lm GB/s "
        "| routing agreement | experts max rel diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['tokens']} | {r['ours us']} | {r['ours without kernels us']} | {r['mlx-lm us']} | "
            f"{r['ours / mlx-lm speedup']}× | {r.get('ours GB/s', '')} | {r.get('mlx-lm GB/s', '')} | "
            f"{r['routing_agreement']} | {r['experts_max_rel_diff']} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--bits", type=int, default=4, choices=(4, 8))
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()
    if backend() == "reference":
        raise SystemExit("no GPU kernel backend here (MLX_GEMMA4_KERNELS=cuda or metal on a GPU)")
    warnings.simplefilter("error", KernelFallbackWarning)  # timing the reference as "ours" would mislead
    ours_modules, their_modules = build(args.bits, args.group_size)
    blocks = runners(ours_modules, their_modules)
    command = "python -m benchmarks.moe " + " ".join(
        [f"--tokens {' '.join(map(str, args.tokens))}", f"--bits {args.bits}", f"--group-size {args.group_size}"])
    result = dict(device=device_name(), mlx=mx.__version__, backend=backend(), bits=args.bits,
                  group_size=args.group_size, command=command, rows=[])
    args.out.mkdir(parents=True, exist_ok=True)
    for tokens in args.tokens:
        result["rows"].append(measure(blocks, ours_modules, their_modules, tokens))
        print(json.dumps(result["rows"][-1]), flush=True)
        (args.out / "moe.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "moe.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
