"""Rungs (c) and (d): the kernels on a real GPU through the public dispatch, against the reference.

    MLX_GEMMA4_KERNELS=cuda python -m pytest tests/kernels -m gpu      # an NVIDIA GPU, MLX's CUDA build
    MLX_GEMMA4_KERNELS=metal python -m pytest tests/kernels -m metal   # Apple silicon

A kernel that fails to build or to match here would fall back to the reference with a warning; these
tests turn that warning into a failure.
"""

import mlx.core as mx
import pytest

from attention_cases import CASES, Case, full, sliding
from mlx_gemma4.kernels import backend, decode_attention, scaled_dot_product_attention
from mlx_gemma4.kernels.decode_attention import TOLERANCE, reference, supports

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.metal,
    pytest.mark.filterwarnings("error::mlx_gemma4.kernels.KernelFallbackWarning"),
    pytest.mark.skipif(backend() == "reference", reason="no GPU backend (set MLX_GEMMA4_KERNELS=cuda or metal)"),
]


def error(case: Case, got) -> float:
    want = reference(case.queries, case.keys, case.values, case.scale, case.mask)
    return mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()


def check(case: Case):
    assert supports(case.queries, case.keys, case.values, case.mask)
    got = decode_attention(case.queries, case.keys, case.values, case.scale, case.mask)
    assert error(case, got) <= TOLERANCE[case.queries.dtype]


@pytest.mark.parametrize("name", CASES)
def test_emulator_cases(name):
    check(CASES[name]())


LARGE = {
    # 31B global layer at 32K tokens: 1024 chunks' worth of keys per kv head, split-K at full width
    "full-512-32:4-bf16-32K": lambda: full(32, 4, 512, mx.bfloat16, length=32768),
    # E2B global layer, a batch of four with different lengths
    "full-512-8:1-bf16-padded": lambda: full(8, 1, 512, mx.bfloat16, length=5000, padding=[0, 1000, 4321, 17]),
    # 31B sliding layer (32:16), window 1024, wrapped, a padded batch
    "sliding-256-32:16-bf16": lambda: sliding(32, 16, 256, mx.bfloat16, window=1024, steps=300, padding=[0, 700]),
    # E4B sliding layer (8:2), window 512
    "sliding-256-8:2-fp16": lambda: sliding(8, 2, 256, mx.float16, window=512, steps=77),
}


@pytest.mark.parametrize("name", LARGE)
def test_gemma_sizes(name):
    check(LARGE[name]())


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("dim,heads,kv_heads", [(256, 8, 1), (256, 8, 2), (256, 4, 2), (512, 8, 1), (512, 8, 2)])
def test_every_model_configuration(dtype, dim, heads, kv_heads):
    check(full(heads, kv_heads, dim, dtype, length=777))
    check(full(heads, kv_heads, dim, dtype, length=300, padding=[0, 11]))


def test_model_hook_routes_decode_steps_to_the_kernel():
    case = sliding(8, 1, 256, mx.bfloat16, window=512, steps=40)
    hooked = scaled_dot_product_attention(case.queries, case.keys, case.values, case.scale, case.mask)
    kernel = decode_attention(case.queries, case.keys, case.values, case.scale, case.mask)
    assert mx.array_equal(hooked, kernel).item()
    prefill = mx.concatenate([case.queries] * 3, axis=2)  # several queries: MLX's own attention
    hooked = scaled_dot_product_attention(prefill, case.keys, case.values, case.scale, "causal")
    mlx = mx.fast.scaled_dot_product_attention(prefill, case.keys, case.values, scale=case.scale, mask="causal")
    assert mx.array_equal(hooked, mlx).item()
