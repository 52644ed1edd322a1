"""The MoE prefill paths (kernels/moe_prefill.py) on the CPU: each equals the experts' float32 reference in
every weight format the CPU runs, with experts left empty or taking every token; the dispatch picks by
token count; a stack of layers does not hold several layers' dequantized experts at once.

MLX's CPU `gather_mm` takes float32 only, so `gathered` and `dequantized` are checked here on float32
activations and scales (quantized codes unchanged); their half-precision runs are in
test_moe_on_device.py. `padded` uses plain matmuls and is checked in every format here too.
"""

import math

import mlx.core as mx
import pytest

from moe_cases import FORMATS, ExpertsCase, experts_case
from mlx_gemma4.kernels import moe_experts, moe_prefill
from mlx_gemma4.kernels.moe_router import random_packed
from mlx_gemma4.kernels.moe_weights import Packed

HIDDEN, INNER, EXPERTS, TOP_K = 128, 128, 16, 4


def in_float32(case: ExpertsCase) -> ExpertsCase:
    """The same values with float32 activations and scales (an exact upcast)."""
    def up(w: Packed) -> Packed:
        return Packed(*[a if a.dtype == mx.uint32 else a.astype(mx.float32) for a in w.arrays],
                      bits=w.bits, group_size=w.group_size)

    return ExpertsCase(case.x.astype(mx.float32), case.indices, case.weights, up(case.gate_up), up(case.down))


def error(path: str, case: ExpertsCase):
    got = moe_prefill.PATHS[path](case.x, case.indices, case.weights, case.gate_up, case.down)
    assert got.shape == case.x.shape and got.dtype == case.x.dtype
    want = moe_experts.float32_reference(case.x, case.indices, case.weights, case.gate_up, case.down)
    return moe_experts.mismatch(got, want)


@pytest.mark.parametrize("path", moe_prefill.PATHS)
@pytest.mark.parametrize("fmt", ["f32", "q4-g64-bf16", "q8-g64-bf16", "q8-g128-f32"])
@pytest.mark.parametrize("tokens", [3, 40])  # 3 x 4 pairs leave at least 4 of the 16 experts empty
def test_paths_match_reference(path, fmt, tokens):
    case = in_float32(experts_case(fmt, tokens, HIDDEN, INNER, EXPERTS, TOP_K, seed=tokens))
    assert error(path, case) is None


@pytest.mark.parametrize("fmt", [f for f in FORMATS if FORMATS[f][0] != mx.float32])
def test_padded_in_half_precision(fmt):
    assert error("padded", experts_case(fmt, 24, HIDDEN, INNER, EXPERTS, TOP_K, seed=7)) is None


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_unquantized_half_precision_experts_on_the_cpu(tokens):
    """bf16 experts that are not quantized: MLX's CPU gather_mm takes float32 only, so decode gathers
    the chosen experts' matrices and prefill goes to `padded` (this crashed before)."""
    case = experts_case("bf16", tokens, HIDDEN, INNER, EXPERTS, TOP_K, seed=tokens)
    with mx.stream(mx.cpu):
        got = moe_experts.experts(case.x, case.indices, case.weights, case.gate_up, case.down)
        want = moe_experts.float32_reference(case.x, case.indices, case.weights, case.gate_up, case.down)
        assert got.dtype == mx.bfloat16 and moe_experts.mismatch(got, want) is None


@pytest.mark.parametrize("path", moe_prefill.PATHS)
def test_one_expert_takes_every_token(path):
    """Expert 5 in every token's slot 0 (the padded slots' capacity is all the tokens), slots 1-3 spread
    over experts 8-15, experts 0-4 and 6-7 empty."""
    case = in_float32(experts_case("q4-g64-bf16", 9, HIDDEN, INNER, EXPERTS, TOP_K))
    spread = 8 + (mx.arange(9 * 3).reshape(9, 3) % 8)
    case.indices = mx.concatenate([mx.full((9, 1), 5), spread], axis=-1).astype(mx.uint32)
    assert error(path, case) is None


def test_padded_hands_lopsided_routing_to_dequantized(monkeypatch):
    """Every token on experts 5 and 6 of 16 (top 2): the slots would be 8x the pairs, past MAX_PADDING,
    so the layer runs `dequantized`, with the same result; an even spread stays on `padded`."""
    calls = []
    dequantized = moe_prefill.dequantized
    monkeypatch.setattr(moe_prefill, "dequantized", lambda *a: calls.append(1) or dequantized(*a))
    case = in_float32(experts_case("q4-g64-bf16", 12, HIDDEN, INNER, EXPERTS, 2))
    assert error("padded", case) is None and not calls
    case.indices = mx.broadcast_to(mx.array([5, 6], mx.uint32), (12, 2))
    assert error("padded", case) is None and calls


def test_dispatch_by_token_count(monkeypatch):
    fewest = next(rule[0] for rule in moe_prefill.DISPATCH["cuda"] if rule[2] != "gathered")
    assert moe_prefill.path("cuda", fewest - 1) == "gathered"
    assert moe_prefill.path("cuda", fewest) != "gathered"
    assert moe_prefill.path("reference", 100_000) == "gathered"

    # The model's entry point reaches the table for a prefill-sized call, and only then.
    calls = []
    monkeypatch.setenv("MLX_GEMMA4_KERNELS", "reference")
    monkeypatch.setitem(moe_prefill.DISPATCH, "reference", ((10, math.inf, "padded"),))
    monkeypatch.setitem(moe_prefill.PATHS, "padded", lambda *args: calls.append(len(args[0])) or moe_prefill.padded(*args))
    for tokens in (9, 40):
        case = in_float32(experts_case("q4-g64-bf16", tokens, HIDDEN, INNER, EXPERTS, TOP_K))
        moe_experts.experts(case.x[None], case.indices[None], case.weights[None], case.gate_up, case.down)
    assert calls == [40]


def peak_megabytes(path: str, layers: int, tokens=64, experts=32, hidden=256, inner=128) -> float:
    """Peak memory above the weights of a stack of `layers` residual MoE layers evaluated as one graph."""
    stack = []
    for layer in range(layers):
        keys = mx.random.split(mx.random.key(layer), 3)
        gate_up = random_packed((experts, 2 * inner, hidden), 4, 64, mx.float32, keys[0])
        down = random_packed((experts, hidden, inner), 4, 64, mx.float32, keys[1])
        chosen = mx.argsort(mx.random.uniform(shape=(tokens, experts), key=keys[2]), axis=-1)[:, :TOP_K]
        stack.append((chosen.astype(mx.uint32), gate_up, down))
    x = mx.random.normal((tokens, hidden))
    weights = mx.softmax(mx.random.normal((tokens, TOP_K)), axis=-1)
    mx.eval([(indices, gate_up.arrays, down.arrays) for indices, gate_up, down in stack], x, weights)
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    for indices, gate_up, down in stack:
        x = x + moe_prefill.PATHS[path](x, indices, weights, gate_up, down)
    mx.eval(x)
    return (mx.get_peak_memory() - before) / 1e6


@pytest.mark.parametrize("path", ["dequantized", "padded"])
def test_peak_memory_does_not_grow_with_layers(path):
    """One layer's dense experts here are 12.6 MB (float32); six layers must peak within half of that of
    one layer (without the dependency on the layer's input they peak ~2.4x higher)."""
    one_layer = 32 * (2 * 128 * 256 + 256 * 128) * 4 / 1e6
    assert peak_megabytes(path, 6) - peak_megabytes(path, 1) < one_layer / 2
