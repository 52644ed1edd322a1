"""The MoE kernels' Metal bodies on the CPU emulator (rung b) against their references: routing (the real
top-8 of 128) and the decode experts (1 to 8 tokens), every weight format, the converter's group sizes,
shuffled schedules, and the 26B-A4B layer of a tiny model running on them end to end."""

import functools

import mlx.core as mx
import numpy as np
import pytest

import metal_emu
from moe_cases import FORMATS, experts_case, router_case
from mlx_gemma4.kernels import moe_experts, moe_router

pytestmark = pytest.mark.skipif(not metal_emu.CXX, reason="needs clang++-19")


def route_on_emulator(case, launch=metal_emu.run):
    return moe_router.run(launch, case.x, case.proj, case.scale, case.per_expert_scale, case.top_k, case.eps)


@pytest.mark.parametrize("fmt", FORMATS)
def test_router_matches_reference(fmt):
    case = router_case(fmt, tokens=3, hidden=256)
    indices, weights = route_on_emulator(case)
    assert indices.dtype == mx.uint32 and weights.dtype == mx.float32 and indices.shape == (3, 8)
    problem = moe_router.mismatch((indices, weights), case.x, case.proj, case.scale, case.per_expert_scale,
                                  case.top_k, case.eps)
    assert problem is None, problem


def test_router_orders_by_logit_and_weights_sum_to_the_expert_scales():
    case = router_case("f32", tokens=2, hidden=128)
    case.per_expert_scale = mx.ones_like(case.per_expert_scale)
    _, weights = route_on_emulator(case)
    assert mx.allclose(weights.sum(-1), mx.ones((2,)), atol=1e-6).item()
    assert (np.diff(np.array(weights), axis=-1) <= 0).all()  # descending logits, descending weights


@pytest.mark.parametrize("seed", [1, 2])
def test_router_shuffled_schedule(seed):
    case = router_case("q8-g64-bf16", tokens=2, hidden=256)
    got = route_on_emulator(case, functools.partial(metal_emu.run, seed=seed))
    assert moe_router.mismatch(got, case.x, case.proj, case.scale, case.per_expert_scale, case.top_k, case.eps) is None


def experts_error(case, launch=metal_emu.run):
    got = moe_experts.run(launch, case.x, case.indices, case.weights, case.gate_up, case.down)
    assert got.shape == case.x.shape and got.dtype == case.x.dtype
    return moe_experts.mismatch(got, moe_experts.float32_reference(case.x, case.indices, case.weights,
                                                                   case.gate_up, case.down))


@pytest.mark.parametrize("fmt", FORMATS)
def test_experts_match_reference(fmt, tokens=2):
    # inner 3 * 64 or 3 * 128: rows of 24/48 (4-bit) or 48/96 (8-bit) words, not multiples of the 32 lanes
    inner = 3 * max(64, FORMATS[fmt][2])
    assert experts_error(experts_case(fmt, tokens, hidden=256, inner=inner)) is None


@pytest.mark.parametrize("fmt, hidden, inner", [
    ("q4-g32-fp16", 96, 160),  # rows of 3 and 5 chunks: most lanes idle; K * 5 = 40 down chunks for 128 threads
    ("q8-g32-bf16", 1056, 96),  # 66 chunks a gate/up row: two full lane steps and 2 lanes; 2 chunks a group
    ("q4-g128-fp16", 384, 128),  # 4 chunks a group
    ("f32", 132, 20),  # 132 output rows: the last down threadgroup has 4 rows past H
])
def test_experts_chunking_edges(fmt, hidden, inner):
    assert experts_error(experts_case(fmt, 2, hidden, inner, experts=10)) is None


def test_experts_eight_tokens_sharing_experts():
    """Decode's upper end, a batch of 8 whose tokens pick overlapping experts of only 10."""
    assert experts_error(experts_case("q4-g64-bf16", 8, hidden=128, inner=64, experts=10)) is None


def test_experts_shuffled_schedule():
    case = experts_case("q4-g64-bf16", 2, hidden=128, inner=64)
    assert experts_error(case, functools.partial(metal_emu.run, seed=3)) is None


def test_experts_at_26b_dimensions():
    """hidden 2816 and expert width 704 (11 and 2.75 blocks of 256 values), 4-bit group 64."""
    assert experts_error(experts_case("q4-g64-bf16", 1, hidden=2816, inner=704, experts=9)) is None


def moe_block(bits: int):
    """The model's Router and Experts at a reduced hidden size with the real 128 experts, top-8, random weights."""
    import mlx.nn as nn
    from mlx_gemma4.model.moe import Experts, Router

    mx.random.seed(0)
    router, experts = Router(256, 128, 8, 1e-6), Experts(256, 64, 128)
    router.scale = mx.random.uniform(0.5, 1.5, (256,))
    router.per_expert_scale = mx.random.uniform(0.5, 1.5, (128,))
    if bits:
        nn.quantize(router, 64, 8)  # the converter's router
        nn.quantize(experts, 64, bits)
    return router, experts


@pytest.mark.parametrize("bits", [0, 4])
def test_model_moe_block_runs_the_emulated_kernels(bits, monkeypatch):
    """The model's MoE modules dispatch a decode step to the kernels (probes included) when a GPU backend is
    chosen, and agree with their CPU reference."""
    from mlx_gemma4.kernels import kernel

    router, experts = moe_block(bits)
    x = mx.random.normal((1, 1, 256), key=mx.random.key(5))
    indices, weights = router(x)
    want = experts(x, indices, weights)
    launched = []

    def emulate(kernel_, **call):
        launched.append(kernel_.name)
        return metal_emu.run(kernel_, **call)

    monkeypatch.setenv("MLX_GEMMA4_KERNELS", "metal")
    monkeypatch.setattr(kernel, "_verdicts", {})
    for module in (moe_experts, moe_router):
        monkeypatch.setattr(module, "launcher", lambda on: emulate)
    got_indices, got_weights = router(x)
    got = experts(x, got_indices, got_weights)
    kind = "q" if bits else "f"
    assert {f"moe_router_{kind}", f"moe_gate_up_{kind}", f"moe_down_{kind}"} <= set(launched)
    assert mx.array_equal(mx.sort(got_indices, -1), mx.sort(indices.astype(mx.uint32), -1)).item()
    assert mx.abs(got - want).max().item() <= 1e-4 * mx.abs(want).max().item()
