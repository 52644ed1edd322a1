"""TurboQuant kernels on a real GPU through the public dispatch, against their references.

    MLX_GEMMA4_KERNELS=cuda python -m pytest tests/kernels/test_tq_on_device.py -m gpu
"""

import mlx.core as mx
import pytest

from mlx_gemma4.kernels import backend
from mlx_gemma4.kernels.tq_attention import ROUNDED_TOLERANCE, TOLERANCE, Recent, reference, tq_attention
from mlx_gemma4.kernels.tq_encode import differences, encode
from mlx_gemma4.turboquant.codec import TurboQuantCodec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.metal,
    pytest.mark.filterwarnings("error::mlx_gemma4.kernels.KernelFallbackWarning"),
    pytest.mark.skipif(backend() == "reference", reason="no GPU backend (set MLX_GEMMA4_KERNELS=cuda or metal)"),
]


@pytest.mark.parametrize("dim", [256, 512])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_encode_equals_reference(dim, bits):
    """The reference's codes except on a boundary to float rounding (tq_encode.differences)."""
    codec = TurboQuantCodec(dim, bits, 7)
    x = mx.random.normal((1, 8, 4099, dim), key=mx.random.key(bits)).astype(mx.bfloat16)
    args = (codec.sign, codec.centroids, codec.boundaries, bits)
    rows = encode(x, *args)
    with mx.stream(mx.cpu):
        assert differences(rows, x, *args) is None


@pytest.mark.parametrize("length", [1, 64, 1000, 4096, 32768, 131072])
@pytest.mark.parametrize("dim,group,k_bits,v_bits", [(512, 8, 4, 4), (512, 4, 4, 3), (256, 8, 3, 3), (256, 2, 2, 4)])
def test_decode_attention_matches_reference(length, dim, group, k_bits, v_bits):
    decode_matches_reference(length, dim, group, k_bits, v_bits)


@pytest.mark.parametrize("length", [1000, 32768])
@pytest.mark.parametrize("dim,group,k_bits,v_bits", [(256, 6, 4, 2), (512, 3, 2, 3)])
def test_odd_heads_per_simdgroup(length, dim, group, k_bits, v_bits):
    """3 query heads a simdgroup (groups of 6 and 3): no power-of-two register arrays."""
    decode_matches_reference(length, dim, group, k_bits, v_bits)


def decode_matches_reference(length, dim, group, k_bits, v_bits):
    k_codec, v_codec = TurboQuantCodec(dim, k_bits, 1), TurboQuantCodec(dim, v_bits, 2)
    keys = mx.random.split(mx.random.key(length), 3)
    n_kv = 2
    q = mx.random.normal((1, n_kv * group, 1, dim), key=keys[0]).astype(mx.bfloat16)
    k = k_codec.encode(mx.random.normal((1, n_kv, length, dim), key=keys[1]).astype(mx.bfloat16))
    v = v_codec.encode(mx.random.normal((1, n_kv, length, dim), key=keys[2]).astype(mx.bfloat16))
    mask = (mx.arange(length) >= length // 3)[None, None, None] if length > 1 else None
    got = tq_attention(q.astype(mx.float32), k, v, k_codec, v_codec, 1.0, mask)
    with mx.stream(mx.cpu):  # MLX's CUDA float32 matmul may round through TF32 (1.3e-4 off at 4K keys)
        want = reference(q.astype(mx.float32), k, v, k_codec, v_codec, 1.0, mask)
    assert mx.abs(got - want).max().item() <= TOLERANCE


@pytest.mark.parametrize("dim,group", [(512, 8), (256, 2)])
def test_bf16_queries_as_the_model_passes_them(dim, group):
    """The kernel rotates bfloat16 queries itself and writes a bfloat16 output."""
    k_codec, v_codec = TurboQuantCodec(dim, 4, 1), TurboQuantCodec(dim, 4, 2)
    keys = mx.random.split(mx.random.key(3), 3)
    q = mx.random.normal((1, 2 * group, 1, dim), key=keys[0]).astype(mx.bfloat16)
    k = k_codec.encode(mx.random.normal((1, 2, 4096, dim), key=keys[1]).astype(mx.bfloat16))
    v = v_codec.encode(mx.random.normal((1, 2, 4096, dim), key=keys[2]).astype(mx.bfloat16))
    got = tq_attention(q, k, v, k_codec, v_codec, 1.0, None)
    with mx.stream(mx.cpu):
        want = reference(q, k, v, k_codec, v_codec, 1.0, None)
    assert got.dtype == mx.bfloat16
    assert mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item() <= ROUNDED_TOLERANCE


def recent_case(length, dim, group, masked, dtype):
    """Two sequences whose newest 64 keys are kept in full precision (their packed copies hidden); the
    second misses its 5 oldest recent keys and, with `masked`, the packed keys before length // 3 (a
    sliding layer's mask)."""
    n_kv, window = 2, 64
    k_codec, v_codec = TurboQuantCodec(dim, 4, 1), TurboQuantCodec(dim, 4, 2)
    keys = mx.random.split(mx.random.key(length), 5)
    q = mx.random.normal((2, n_kv * group, 1, dim), key=keys[0]).astype(dtype)
    k = k_codec.encode(mx.random.normal((2, n_kv, length, dim), key=keys[1]).astype(mx.bfloat16))
    v = v_codec.encode(mx.random.normal((2, n_kv, length, dim), key=keys[2]).astype(mx.bfloat16))
    newest = min(window, length)
    recent = Recent(mx.random.normal((2, n_kv, newest, dim), key=keys[3]).astype(dtype),
                    mx.random.normal((2, n_kv, newest, dim), key=keys[4]).astype(dtype),
                    packed_mask=(mx.arange(length) < length - newest)[None, None, None],
                    mask=(mx.arange(newest)[None] >= mx.array([[0], [5]]))[:, None, None])
    mask = (mx.arange(length) >= length // 3)[None, None, None] if masked else None
    return q, k, v, k_codec, v_codec, mask, recent


@pytest.mark.parametrize("length", [1, 4096, 131072])
@pytest.mark.parametrize("dim,group,masked", [(512, 8, False), (256, 8, True)], ids=["global", "sliding"])
def test_decode_attention_with_a_recent_window_matches_reference(length, dim, group, masked):
    """The recent window attended in the combine pass and merged with the packed partials (at length 1
    the second sequence sees no key at all)."""
    q, k, v, k_codec, v_codec, mask, recent = recent_case(length, dim, group, masked, mx.float32)
    got = tq_attention(q, k, v, k_codec, v_codec, 1.0, mask, recent)
    with mx.stream(mx.cpu):  # in float64: at these scores (std ~22) the float32 reference is itself 1.2e-4 off
        want = reference(q.astype(mx.float64), k, v, k_codec, v_codec, 1.0, mask, recent)
        assert mx.abs(got - want).max().item() <= TOLERANCE  # float64: on the CPU


@pytest.mark.parametrize("dim,group", [(512, 8), (256, 2)])
def test_recent_window_in_bf16_as_the_model_passes_it(dim, group):
    q, k, v, k_codec, v_codec, mask, recent = recent_case(4096, dim, group, dim == 256, mx.bfloat16)
    got = tq_attention(q, k, v, k_codec, v_codec, 1.0, mask, recent)
    with mx.stream(mx.cpu):
        want = reference(q, k, v, k_codec, v_codec, 1.0, mask, recent)
    assert got.dtype == mx.bfloat16
    assert mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item() <= ROUNDED_TOLERANCE
