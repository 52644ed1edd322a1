"""The 26B-A4B MoE block on the GPU: ours against mlx-lm's (its gemma4 Router + SwitchGLU experts).

    MLX_GEMMA4_KERNELS=cuda python -m benchmarks.moe --out benchmarks/results

The block is what a decoder layer spends on its experts: routing (rms-norm·scale, projection, top-8
of 128, softmax, per-expert scale) and the experts' GeGLU with the weighted combine, at 26B-A4B's
dimensions (hidden 2816, expert width 704), bfloat16 activations, experts affine 4-bit (group 64) and
the router's projection 8-bit, as the converter and mlx-lm write them. The same random weights in
every run. Decode (1 token): ours (kernels/moe_router.py and moe_experts.py through the model's
modules), ours without kernels (the references) and mlx-lm, alternated trial by trial (each trial a
batch of independent calls evaluated together, divided by the calls; the order rotates between trials),
so that a drift of clocks or host load touches all three alike: the median µs of each, and the ratio as
the median of the per-trial ratios with their range (`--tokens 1` runs only this). Prefill (32 to 2048 tokens): ours as
dispatched, each of kernels/moe_prefill.py's paths behind our router, and mlx-lm; one call per trial,
and the peak memory of each. Writes moe.json and moe.md after every row.
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
from mlx_gemma4.kernels import KernelFallbackWarning, backend, moe_prefill
from mlx_gemma4.kernels.moe_experts import reference as experts_reference
from mlx_gemma4.kernels.moe_router import reference as router_reference
from mlx_gemma4.model.moe import Experts, Router, packed
from mlx_gemma4.presets import preset_config

TOKENS = [1, 32, 128, 512, 2048]  # 32 and 128: where the prefill paths cross over (moe_prefill.DISPATCH)
DECODE_CALLS = 16
TRIALS = {"decode": 31, "prefill": 5}


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


def runners(ours_modules, their_modules, tokens: int) -> dict:
    """The blocks timed at this token count, by name."""
    router, experts = ours_modules
    their_router, theirs = their_modules
    gate_up, down = packed(experts.gate_up_proj), packed(experts.down_proj)

    def ours(x):
        return experts(x, *router(x))

    def ours_without_kernels(x):
        indices, weights = router_reference(x, packed(router.proj), router.scale, router.per_expert_scale,
                                            router.top_k, router.eps)
        return experts_reference(x, indices, weights, gate_up, down)

    def prefill_path(name):
        def block(x):
            indices, weights = router(x)
            return moe_prefill.PATHS[name](x.reshape(tokens, -1), indices.reshape(tokens, -1),
                                           weights.reshape(tokens, -1), gate_up, down)
        return block

    def mlx_lm(x):
        return theirs(x, *their_router(x))

    if tokens == 1:
        return {"ours": ours, "ours without kernels": ours_without_kernels, "mlx-lm": mlx_lm}
    return {"ours": ours, **{name: prefill_path(name) for name in moe_prefill.PATHS}, "mlx-lm": mlx_lm}


def alternated(blocks: dict, inputs: list, trials: int) -> tuple:
    """({name: {"call", "build", "eval": seconds per call in each trial}}, {name: peak bytes of its first
    call}); within a trial the blocks run one after another, starting one later each trial. "build" is
    the host making the graphs, "eval" the evaluation of the built graphs, "call" both in turn."""
    peaks = {}
    for name, block in blocks.items():
        mx.synchronize()
        mx.reset_peak_memory()
        mx.eval(block(inputs[0]))  # build, probe and warm up
        peaks[name] = mx.get_peak_memory()
    names = list(blocks)
    times = {name: {"call": [], "build": [], "eval": []} for name in names}
    for trial in range(trials):
        for name in names[trial % len(names):] + names[: trial % len(names)]:
            mx.synchronize()
            start = time.perf_counter()
            outputs = [blocks[name](x) for x in inputs]
            built = time.perf_counter()
            mx.eval(outputs)
            done = time.perf_counter()
            for part, seconds in (("call", done - start), ("build", built - start), ("eval", done - built)):
                times[name][part].append(seconds / len(inputs))
    return times, peaks


def timed(block, inputs: list, trials: int) -> tuple:
    """(median seconds per call, peak bytes of the first call)."""
    mx.synchronize()
    mx.reset_peak_memory()
    mx.eval(block(inputs[0]))  # build, probe and warm up
    peak = mx.get_peak_memory()
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        mx.eval([block(x) for x in inputs])
        times.append((time.perf_counter() - start) / len(inputs))
    return statistics.median(times), peak


def active_bytes(experts: Experts, router: Router, tokens: int) -> int:
    """Weight bytes one decode token reads: the router and 8 of 128 experts (prefill reads more experts)."""
    expert_bytes = sum(a.nbytes for layer in (experts.gate_up_proj, experts.down_proj) for a in packed(layer).arrays)
    routed = min(128, 8 * tokens)
    return sum(a.nbytes for a in packed(router.proj).arrays) + expert_bytes * routed // 128


def norms_tail(hidden: int):
    """What a decoder layer does after its experts (model/text.py): three RMSNorms and two adds,
    h + norm(norm_1(dense) + norm_2(experts)); its time is what fusing them into the combine could save."""
    keys = mx.random.split(mx.random.key(1), 4)
    weights = [mx.random.uniform(0.5, 1.5, (hidden,), key=k).astype(mx.bfloat16) for k in keys[:3]]
    dense = mx.random.normal((1, 1, hidden), key=keys[3]).astype(mx.bfloat16)
    mx.eval(weights, dense)

    def tail(experts_out):
        ffn = mx.fast.rms_norm(dense, weights[0], 1e-6) + mx.fast.rms_norm(experts_out, weights[1], 1e-6)
        return experts_out + mx.fast.rms_norm(ffn, weights[2], 1e-6)

    return tail


def measure(ours_modules, their_modules, tokens: int) -> dict:
    hidden = ours_modules[1].gate_up_proj.weight.shape[-1] * 32 // ours_modules[1].gate_up_proj.bits
    decode = tokens == 1
    calls = DECODE_CALLS if decode else 1
    keys = mx.random.split(mx.random.key(tokens), calls)
    inputs = [mx.random.normal((1, tokens, hidden), key=k).astype(mx.bfloat16) for k in keys]
    mx.eval(inputs)
    row = dict(tokens=tokens, **agreement(ours_modules, their_modules, inputs[0]))
    if decode:
        return {**row, **measure_decode(ours_modules, their_modules, inputs)}
    row["ours path"] = moe_prefill.path(backend(), tokens)
    for name, block in runners(ours_modules, their_modules, tokens).items():
        start = time.perf_counter()
        seconds, peak = timed(block, inputs, TRIALS["prefill"])
        row[f"{name} us"] = round(seconds * 1e6, 1)
        row[f"{name} peak MB"] = round(peak / 1e6)
        print(f"  {tokens} tokens, {name}: {row[f'{name} us']} us ({time.perf_counter() - start:.1f} s)", flush=True)
    row["ours / mlx-lm speedup"] = round(row["mlx-lm us"] / row["ours us"], 2)
    row["ours tok/s"] = round(tokens / row["ours us"] * 1e6, 1)
    row["mlx-lm tok/s"] = round(tokens / row["mlx-lm us"] * 1e6, 1)
    return row


def measure_decode(ours_modules, their_modules, inputs: list) -> dict:
    """The decode row: the three blocks alternated trial by trial (module doc)."""
    start = time.perf_counter()
    times, peaks = alternated(runners(ours_modules, their_modules, 1), inputs, TRIALS["decode"])
    row = {}
    for name in times:
        row[f"{name} us"] = round(statistics.median(times[name]["call"]) * 1e6, 1)
        row[f"{name} build us"] = round(statistics.median(times[name]["build"]) * 1e6, 1)
        row[f"{name} eval us"] = round(statistics.median(times[name]["eval"]) * 1e6, 1)
        row[f"{name} peak MB"] = round(peaks[name] / 1e6)
        print(f"  1 token, {name}: {row[f'{name} us']} us (build {row[f'{name} build us']}, "
              f"eval {row[f'{name} eval us']})", flush=True)
    for part, key in (("call", "speedup"), ("build", "build speedup"), ("eval", "eval speedup")):
        ratios = [theirs / ours for theirs, ours in zip(times["mlx-lm"][part], times["ours"][part])]
        row[f"ours / mlx-lm {key}"] = round(statistics.median(ratios), 2)
        row[f"{key} range"] = [round(min(ratios), 2), round(max(ratios), 2)]
    row["ours tok/s"] = round(1 / row["ours us"] * 1e6, 1)
    row["mlx-lm tok/s"] = round(1 / row["mlx-lm us"] * 1e6, 1)
    row["norms tail us"] = round(timed(norms_tail(inputs[0].shape[-1]), inputs, TRIALS["decode"])[0] * 1e6, 1)
    nbytes = active_bytes(ours_modules[1], ours_modules[0], 1)
    row["ours GB/s"] = round(nbytes / row["ours eval us"] / 1e3, 1)
    row["mlx-lm GB/s"] = round(nbytes / row["mlx-lm eval us"] / 1e3, 1)
    print(f"  decode: {time.perf_counter() - start:.1f} s", flush=True)
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
    decode = [r for r in result["rows"] if r["tokens"] == 1]
    prefill = [r for r in result["rows"] if r["tokens"] > 1]
    lines = [
        f"# 26B-A4B MoE block: ours vs mlx-lm ({result['device']}, mlx {result['mlx']})",
        "",
        f"Router (8-bit) + 128 experts top-8, hidden 2816, width 704, experts {result['bits']}-bit group "
        f"{result['group_size']}, bfloat16; µs per block call (routing included). "
        f"`{result['command']}`",
        "",
        f"Decode: {TRIALS['decode']} trials of {DECODE_CALLS} independent calls, ours, ours without kernels and "
        "mlx-lm alternated trial by trial; medians of each, and ours / mlx-lm as the median of the per-trial "
        "ratios [min, max]. A call is the host building the block's graph (Python, op and kernel calls) then "
        "its evaluation; both parts are also timed alone (build: the graphs of a trial's calls made; eval: "
        "those graphs evaluated). In generation the next step's build overlaps this step's evaluation. "
        "GB/s: the router's and 8 experts' weight bytes over the evaluation. Norms tail: the layer's three "
        "RMSNorms and two adds after the experts (model/text.py), what a combine fused with them could save.",
        "",
        "| tokens | part | ours µs | ours without kernels µs | mlx-lm µs | ours / mlx-lm [min, max] |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in decode:
        for part, suffix, key in (("call", "", "speedup"), ("build", " build", "build speedup"),
                                  ("eval", " eval", "eval speedup")):
            lines.append(
                f"| {r['tokens']} | {part} | {r[f'ours{suffix} us']} | {r[f'ours without kernels{suffix} us']} | "
                f"{r[f'mlx-lm{suffix} us']} | {r[f'ours / mlx-lm {key}']}× [{r[f'{key} range'][0]}, "
                f"{r[f'{key} range'][1]}] |"
            )
    lines += [
        "",
        "| tokens | ours GB/s (eval) | mlx-lm GB/s (eval) | norms tail µs | routing agreement | experts max rel diff |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in decode:
        lines.append(f"| {r['tokens']} | {r['ours GB/s']} | {r['mlx-lm GB/s']} | {r['norms tail us']} | "
                     f"{r['routing_agreement']} | {r['experts_max_rel_diff']} |")
    paths = list(moe_prefill.PATHS)
    lines += [
        "",
        f"Prefill: median of {TRIALS['prefill']} calls; µs (peak MB of one call, weights included). Ours runs "
        "the path kernels/moe_prefill.py's DISPATCH picks; the path columns run each one behind our router.",
        "",
        "| tokens | ours path | ours | " + " | ".join(paths) + " | mlx-lm | ours / mlx-lm | ours tok/s "
        "| routing agreement | experts max rel diff |",
        "|---:|---|" + "---:|" * (len(paths) + 6),
    ]
    for r in prefill:
        cells = [f"{r[f'{name} us']} ({r[f'{name} peak MB']})" for name in ("ours", *paths, "mlx-lm")]
        lines.append(
            f"| {r['tokens']} | {r['ours path']} | " + " | ".join(cells) + f" | {r['ours / mlx-lm speedup']}× | "
            f"{r['ours tok/s']} | {r['routing_agreement']} | {r['experts_max_rel_diff']} |"
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
    began = time.perf_counter()
    ours_modules, their_modules = build(args.bits, args.group_size)
    print(f"built the weights ({time.perf_counter() - began:.1f} s)", flush=True)
    command = "python -m benchmarks.moe " + " ".join(
        [f"--tokens {' '.join(map(str, args.tokens))}", f"--bits {args.bits}", f"--group-size {args.group_size}"])
    result = dict(device=device_name(), mlx=mx.__version__, backend=backend(), bits=args.bits,
                  group_size=args.group_size, command=command, rows=[])
    args.out.mkdir(parents=True, exist_ok=True)
    for tokens in args.tokens:
        result["rows"].append(measure(ours_modules, their_modules, tokens))
        print(json.dumps(result["rows"][-1]), flush=True)
        (args.out / "moe.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "moe.md").write_text(markdown(result))
    print(f"done in {time.perf_counter() - began:.1f} s", flush=True)


if __name__ == "__main__":
    main()
