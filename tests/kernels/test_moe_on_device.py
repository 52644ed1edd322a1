"""Rungs (c)/(d) for the MoE kernels: routing and the decode experts at 26B-A4B's real dimensions on a GPU,
through the public dispatch, against the references; a fallback to the reference fails the test.

    MLX_GEMMA4_KERNELS=cuda python -m pytest tests/kernels/test_moe_on_device.py -m gpu

Routing and decode run four formats (float32, 4-bit group 64 and 32, 8-bit group 64: every chunk layout
and dtype path of the kernels) rather than all of moe_cases.FORMATS: each is a kernel configuration that a
fresh CUDA process compiles once (~3-10 s), and `-k "router or decode_experts"` should stay near 100 s.
"""

from functools import lru_cache

import mlx.core as mx
import pytest

from moe_cases import experts_case, router_case
from mlx_gemma4.kernels import backend, moe_experts, moe_prefill, moe_router

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.metal,
    pytest.mark.filterwarnings("error::mlx_gemma4.kernels.KernelFallbackWarning"),
    pytest.mark.skipif(backend() == "reference", reason="no GPU backend (set MLX_GEMMA4_KERNELS=cuda or metal)"),
]
HIDDEN, INNER, EXPERTS, TOP_K = 2816, 704, 128, 8
DEVICE_FORMATS = ["f32", "q4-g64-bf16", "q8-g64-bf16", "q4-g32-fp16"]


@pytest.mark.parametrize("fmt", DEVICE_FORMATS)
@pytest.mark.parametrize("tokens", [1, 8, 512])
def test_router(fmt, tokens):
    case = router_case(fmt, tokens, HIDDEN, EXPERTS, TOP_K)
    assert moe_router.supports(case.x, case.proj, case.scale, case.per_expert_scale, case.top_k)
    got = moe_router.route(case.x, case.proj, case.scale, case.per_expert_scale, case.top_k, case.eps)
    assert moe_router.mismatch(got, case.x, case.proj, case.scale, case.per_expert_scale, case.top_k, case.eps) is None


@pytest.mark.parametrize("fmt", DEVICE_FORMATS)
@pytest.mark.parametrize("tokens", [1, 8])
def test_decode_experts(fmt, tokens):
    case = experts_case(fmt, tokens, HIDDEN, INNER, experts=32)
    assert moe_experts.supports(case.x, case.indices, case.weights, case.gate_up, case.down)
    got = moe_experts.experts(case.x, case.indices, case.weights, case.gate_up, case.down)
    want = moe_experts.float32_reference(case.x, case.indices, case.weights, case.gate_up, case.down)
    assert moe_experts.mismatch(got, want) is None


def test_prefill_goes_to_the_sorted_reference():
    case = experts_case("q4-g64-bf16", 64, HIDDEN, INNER, experts=32)
    assert not moe_experts.supports(case.x, case.indices, case.weights, case.gate_up, case.down)
    got = moe_experts.experts(case.x, case.indices, case.weights, case.gate_up, case.down)
    assert mx.array_equal(got, moe_experts.reference(case.x, case.indices, case.weights, case.gate_up, case.down)).item()


@lru_cache(maxsize=None)
def prefill_case(fmt: str):
    """128 tokens over 16 experts, ~64 pairs each, and the float32 reference (on the CPU: ~10 s), computed
    once per format."""
    case = experts_case(fmt, 128, HIDDEN, INNER, experts=16)
    return case, moe_experts.float32_reference(case.x, case.indices, case.weights, case.gate_up, case.down)


@pytest.mark.parametrize("fmt", ["bf16", "q4-g64-bf16", "q8-g64-bf16"])
@pytest.mark.parametrize("path", moe_prefill.PATHS)
def test_prefill_paths(fmt, path):
    case, want = prefill_case(fmt)
    got = moe_prefill.PATHS[path](case.x, case.indices, case.weights, case.gate_up, case.down)
    assert got.dtype == case.x.dtype
    assert moe_experts.mismatch(got, want) is None
