"""Rungs (c) and (d) for prefill attention: the kernel on a real GPU through the public dispatch, against
the reference (see test_kernels_on_device.py for the commands); a fallback warning fails the test."""

import mlx.core as mx
import pytest

from prefill_cases import CHUNKS, Chunk, full, sliding
from mlx_gemma4.kernels import CausalMask, backend, prefill_attention, scaled_dot_product_attention
from mlx_gemma4.kernels.prefill_attention import TOLERANCE, reference, supports
from mlx_gemma4.kernels.sdpa import PREFILL_HEAD_DIMS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.metal,
    pytest.mark.filterwarnings("error::mlx_gemma4.kernels.KernelFallbackWarning"),
    pytest.mark.skipif(backend() == "reference", reason="no GPU backend (set MLX_GEMMA4_KERNELS=cuda or metal)"),
]


def check(chunk: Chunk):
    assert supports(chunk.queries, chunk.keys, chunk.values, chunk.mask)
    got = prefill_attention(chunk.queries, chunk.keys, chunk.values, chunk.scale, chunk.mask)
    with mx.stream(mx.cpu):  # MLX's CUDA float32 matmuls round through TF32, past the float32 tolerance
        want = reference(chunk.queries, chunk.keys, chunk.values, chunk.scale, chunk.mask)
    assert mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item() <= TOLERANCE[chunk.queries.dtype]


@pytest.mark.parametrize("name", CHUNKS)
def test_emulator_cases(name):
    check(CHUNKS[name]())


LARGE = {
    # E2B sliding layer, window 512: a 512-token chunk after the ring wrapped
    "sliding-256-8:1-bf16": lambda: sliding(8, 1, 256, mx.bfloat16, window=512, prompt=1300, length=512),
    # 31B sliding layer (32:16), window 1024, a padded batch
    "sliding-256-32:16-bf16-padded": lambda: sliding(32, 16, 256, mx.bfloat16, window=1024, prompt=1500, length=300,
                                                     padding=[0, 700]),
    # 31B global layer (32:4), a second chunk of 512
    "full-512-32:4-bf16": lambda: full(32, 4, 512, mx.bfloat16, prompt=3000, length=512),
    # E2B global layer, a first chunk of a batch of three with different lengths
    "full-512-8:1-fp16-padded": lambda: full(8, 1, 512, mx.float16, prompt=0, length=777, padding=[0, 100, 431]),
}


@pytest.mark.parametrize("name", LARGE)
def test_gemma_sizes(name):
    check(LARGE[name]())


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("dim,heads,kv_heads,window", [(256, 8, 1, 512), (256, 4, 1, 512), (256, 2, 1, 1024),
                                                        (512, 8, 1, None), (512, 4, 1, None)])
def test_every_model_configuration(dtype, dim, heads, kv_heads, window):
    if window:
        check(sliding(heads, kv_heads, dim, dtype, window=window, prompt=window + 100, length=129))
    else:
        check(full(heads, kv_heads, dim, dtype, prompt=300, length=129, padding=[0, 50]))


def test_model_hook_routes_prefill_by_head_dim():
    """A causal global prefill chunk takes the kernel only where sdpa.PREFILL_HEAD_DIMS lists its head dim
    (none while MLX's path is faster), else MLX's op, bit for bit."""
    chunk = full(8, 1, 512, mx.bfloat16, prompt=100, length=64)
    q, k, v, scale = chunk.queries, chunk.keys, chunk.values, chunk.scale
    hooked = scaled_dot_product_attention(q, k, v, scale, "causal")
    if 512 in PREFILL_HEAD_DIMS:
        want = prefill_attention(q, k, v, scale, CausalMask())
    else:
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    assert mx.array_equal(hooked, want).item()
