"""Backend choice and the fallback: on this CPU machine, auto means the reference, and a GPU backend forced
by the environment falls back to the reference with a single warning instead of failing."""

import warnings

import mlx.core as mx
import pytest

from attention_cases import CASES
from mlx_gemma4.kernels import ENV, KernelFallbackWarning, backend, decode_attention, kernel, scaled_dot_product_attention
from mlx_gemma4.kernels.decode_attention import reference

pytestmark = pytest.mark.skipif(mx.metal.is_available() or mx.cuda.is_available(), reason="CPU-only behaviour")


def test_auto_is_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert backend() == "reference"
    monkeypatch.setenv(ENV, "gpu")
    with pytest.raises(ValueError, match="reference, metal, cuda"):
        backend()


def test_unbuildable_backend_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    monkeypatch.setattr(kernel, "_verdicts", {})
    case = CASES["full-512-8:1-fp16-padded"]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [decode_attention(case.queries, case.keys, case.values, case.scale, case.mask) for _ in range(2)]
    assert [w.category for w in caught] == [KernelFallbackWarning]
    want = reference(case.queries, case.keys, case.values, case.scale, case.mask)
    assert all(mx.array_equal(out, want).item() for out in outputs)


def test_model_hook_is_mlx_attention_on_cpu():
    case = CASES["sliding-256-8:1-bf16-wrapped"]()
    got = scaled_dot_product_attention(case.queries, case.keys, case.values, 0.5, case.mask)
    want = mx.fast.scaled_dot_product_attention(case.queries, case.keys, case.values, scale=0.5, mask=case.mask)
    assert mx.array_equal(got, want).item()
