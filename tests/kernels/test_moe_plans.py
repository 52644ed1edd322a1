"""The MoE decode kernels' plans, cached per signature (moe_router.plan, moe_experts.plan): a changed
backend, format or shape takes a plan of its own, the router's token count only sizes its launch, prefill
shapes are never cached, an unsupported format or a failed probe takes the reference, and a planned call
launches what the unplanned kernel path (`run`, the emulator tests' entry) launches."""

import mlx.core as mx
import pytest

from moe_cases import experts_case, router_case
from test_decode_plans import record_launches
from mlx_gemma4.kernels import ENV, moe_experts, moe_router


@pytest.fixture
def launches(monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    calls = record_launches(monkeypatch, moe_router)
    record_launches(monkeypatch, moe_experts)
    monkeypatch.setattr(moe_experts, "launcher", moe_router.launcher)  # one record for both modules
    return calls


def route_plan(case):
    return moe_router.plan(case.x, case.proj, case.scale, case.per_expert_scale, case.top_k, case.eps)


def experts_plan(case):
    return moe_experts.plan(case.x, case.indices, case.weights, case.gate_up, case.down)


def test_router_one_plan_per_format_and_the_token_count_sizes_the_launch(launches):
    one, three = router_case("q4-g64-bf16", 1, 256), router_case("q4-g64-bf16", 3, 256)
    run = route_plan(one)
    assert route_plan(three) is run  # prefill chunks of any length share it
    run(one.x, one.proj, one.scale, one.per_expert_scale)
    indices, weights = run(three.x, three.proj, three.scale, three.per_expert_scale)
    assert indices.shape == weights.shape == (3, 8) and indices.dtype == mx.uint32
    assert launches[1][2][0] == 3 * launches[0][2][0]  # a threadgroup per token
    others = [router_case("q8-g64-bf16", 1, 256), router_case("bf16", 1, 256), router_case("q4-g64-bf16", 1, 512),
              router_case("q4-g64-bf16", 1, 256, top_k=4)]
    plans = [route_plan(case) for case in others]
    assert None not in plans and len({id(p) for p in plans + [run]}) == len(plans) + 1


def test_router_plan_launches_what_run_launches(launches):
    case = router_case("q4-g64-bf16", 2, 256)
    route_plan(case)(case.x, case.proj, case.scale, case.per_expert_scale)
    moe_router.run(moe_router.launcher("cuda"), case.x, case.proj, case.scale, case.per_expert_scale, case.top_k,
                   case.eps)
    assert launches[0] == launches[1]


def test_experts_one_plan_per_signature_and_none_for_prefill(launches):
    case = experts_case("q4-g64-bf16", 1, 256, 64)
    run = experts_plan(case)
    assert run is not None and experts_plan(case) is run
    out = run(case.x, case.indices, case.weights, case.gate_up, case.down)
    assert out.shape == case.x.shape and out.dtype == case.x.dtype
    others = [experts_case("q8-g64-bf16", 1, 256, 64), experts_case("q4-g64-bf16", 2, 256, 64),
              experts_case("q4-g64-bf16", 1, 256, 128), experts_case("f32", 1, 256, 64)]
    plans = [experts_plan(other) for other in others]
    assert None not in plans and len({id(p) for p in plans + [run]}) == len(plans) + 1
    prefill = experts_case("q4-g64-bf16", moe_experts.DECODE_TOKENS + 1, 256, 64)
    cached = len(moe_experts._plans)
    assert experts_plan(prefill) is None and len(moe_experts._plans) == cached


def test_experts_plan_launches_what_run_launches(launches):
    case = experts_case("q4-g64-bf16", 3, 256, 64)
    experts_plan(case)(case.x, case.indices, case.weights, case.gate_up, case.down)
    moe_experts.run(moe_experts.launcher("cuda"), case.x, case.indices, case.weights, case.gate_up, case.down)
    assert launches[:2] == launches[2:]


def test_unsupported_or_unusable_takes_the_reference(monkeypatch, launches):
    case = experts_case("q4-g64-bf16", 1, 256, 64)
    monkeypatch.setenv(ENV, "reference")
    assert experts_plan(case) is None and route_plan(router_case("q4-g64-bf16", 1, 256)) is None
    monkeypatch.setenv(ENV, "cuda")
    assert route_plan(router_case("q4-g64-bf16", 1, 256, experts=48)) is None  # experts not a multiple of 32
    monkeypatch.setattr(moe_experts, "usable", lambda key, probe: False)
    assert experts_plan(case) is None
    want = moe_experts.reference(case.x, case.indices, case.weights, case.gate_up, case.down)
    got = moe_experts.experts(case.x, case.indices, case.weights, case.gate_up, case.down)
    assert mx.array_equal(got, want).item()
