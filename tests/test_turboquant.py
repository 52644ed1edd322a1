"""TurboQuant codec: codebooks against the published tables, distortion against the paper's bounds,
packing, rotation, the encoder's determinism, and attention in the rotated basis."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.kernels import tq_attention
from mlx_gemma4.kernels.tq_attention import reference as tq_reference
from mlx_gemma4.kernels.tq_encode import reference as encode_reference
from mlx_gemma4.turboquant.codebook import lloyd_max
from mlx_gemma4.turboquant.codec import TurboQuantCodec, theoretical_bounds
from mlx_gemma4.turboquant.packing import pack, unpack, words
from mlx_gemma4.turboquant.rotation import fwht, hadamard, rotate, signs, unrotate

# research/turboquant.md §1.3: exact Beta(d) Lloyd-Max, positive centroids ×√d, and d·MSE
PUBLISHED = {
    (256, 2): ([0.452618, 1.507805], 0.116740),
    (256, 3): ([0.244760, 0.754667, 1.340247, 2.141669], 0.034256),
    (256, 4): ([0.128134, 0.387214, 0.655187, 0.939714, 1.251989, 1.611168, 2.057411, 2.710567], 0.009408),
    (512, 2): ([0.452699, 1.509111], 0.117111),
    (512, 3): ([0.244927, 0.755336, 1.342077, 2.146797], 0.034402),
    (512, 4): ([0.128264, 0.387631, 0.655973, 0.941026, 1.254107, 1.614601, 2.063199, 2.721539], 0.009454),
}


@pytest.mark.parametrize("dim,bits", PUBLISHED)
def test_codebook_matches_published_table(dim, bits):
    centroids, boundaries, mse = lloyd_max(dim, bits)
    positive, published_mse = PUBLISHED[(dim, bits)]
    assert np.allclose(centroids, -centroids[::-1])  # symmetric
    assert np.abs(centroids[len(centroids) // 2 :] * math.sqrt(dim) - positive).max() < 2e-6
    assert np.allclose(boundaries, (centroids[1:] + centroids[:-1]) / 2)
    assert abs(mse - published_mse) < 2e-6


def unit_vectors(n, dim, seed=0):
    x = mx.random.normal((n, dim), key=mx.random.key(seed))
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("dim", [256, pytest.param(512, marks=pytest.mark.slow)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_distortion_within_paper_bounds_and_codebook_mse(dim, bits):
    codec = TurboQuantCodec(dim, bits, seed=5)
    x = unit_vectors(2000, dim)
    distortion = mx.mean(mx.sum((codec.decode(codec.encode(x)) - x) ** 2, axis=-1)).item()
    low, high = theoretical_bounds(bits)
    assert low <= distortion <= high
    assert abs(distortion / codec.unit_mse - 1) < 0.05


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_stored_norm_makes_the_dequantized_norm_exact(bits):
    """The row keeps the encoder's codes; its norm word is ‖x‖/‖c[codes]‖, so ‖x̃‖ = ‖x‖."""
    codec = TurboQuantCodec(64, bits, seed=3)
    x = mx.random.normal((300, 64), key=mx.random.key(bits)) * 5
    rows = codec.encode(x)
    ratio = mx.linalg.norm(codec.decode(rows), axis=-1) / mx.linalg.norm(x, axis=-1)
    assert mx.abs(ratio - 1).max().item() < 1e-5
    # the codebook shrinks (E‖c‖ < 1), so the stored norm exceeds ‖x‖
    assert mx.mean(codec.norms(rows)[:, 0] / mx.linalg.norm(x, axis=-1)).item() > 1


def test_anisotropic_inputs_are_gaussianized():
    """Few huge channels (outlier-heavy keys): the rotation keeps the distortion at the codebook's."""
    dim, bits = 512, 4
    rng = np.random.default_rng(1)
    scales = np.exp(rng.normal(0, 1, dim)).astype(np.float32)
    scales[:4] *= 20
    x = mx.array(rng.standard_normal((2000, dim)).astype(np.float32) * scales)
    codec = TurboQuantCodec(dim, bits, seed=2)
    relative = mx.sum((codec.decode(codec.encode(x)) - x) ** 2, axis=-1) / mx.sum(x * x, axis=-1)
    assert mx.mean(relative).item() < 1.15 * codec.unit_mse


def test_degenerate_vectors():
    dim = 256
    codec = TurboQuantCodec(dim, 3, seed=0)
    x = mx.stack([mx.zeros(dim), mx.ones(dim), mx.eye(dim)[7] * 1e4, hadamard(dim)[3]])
    decoded = codec.decode(codec.encode(x))
    assert not mx.any(mx.isnan(decoded)).item()
    assert mx.array_equal(decoded[0], mx.zeros(dim)).item()
    relative = mx.sum((decoded[1:] - x[1:]) ** 2, -1) / mx.sum(x[1:] ** 2, -1)
    assert mx.max(relative).item() < 3 * codec.unit_mse


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dim", [32, 256, 512])
def test_packing_round_trip(bits, dim):
    codes = mx.random.randint(0, 2**bits, (3, 2, dim), key=mx.random.key(bits)).astype(mx.uint32)
    packed = pack(codes, bits)
    assert packed.shape == (3, 2, words(dim, bits)) and packed.dtype == mx.uint32
    assert mx.array_equal(unpack(packed, bits, dim), codes).item()


def test_three_bits_use_two_planes_without_straddling():
    codes = mx.zeros((64,), mx.uint32)
    codes[33] = 7  # low bits in word 2 at bits 2-3, high bit in plane word 1 at bit 1
    packed = np.array(pack(codes, 3))
    assert packed.tolist() == [0, 0, 3 << 2, 0, 0, 1 << 1]


def test_bad_bits_and_dims_are_refused():
    with pytest.raises(ValueError, match="2, 3 or 4"):
        TurboQuantCodec(256, 5, 0)
    with pytest.raises(ValueError, match="power-of-two"):
        TurboQuantCodec(96, 4, 0)


def test_rotation_is_orthogonal_and_seeded():
    dim = 512
    h = hadamard(dim)
    assert mx.abs(h @ h - mx.eye(dim)).max().item() < 1e-5
    x = mx.random.normal((4, dim))
    assert mx.abs(fwht(x) / math.sqrt(dim) - x @ h).max().item() < 1e-4
    s = signs(3, dim)
    assert mx.abs(unrotate(rotate(x, s), s) - x).max().item() < 1e-4
    assert mx.array_equal(s, signs(3, dim)).item() and not mx.array_equal(s, signs(4, dim)).item()


def test_prefill_and_decode_encode_identically():
    """The encoder is per vector: encoding a chunk or its tokens one by one gives the same rows."""
    codec = TurboQuantCodec(256, 3, seed=1)
    x = mx.random.normal((1, 2, 40, 256)).astype(mx.bfloat16)
    whole = encode_reference(x, codec.sign, codec.centroids, codec.boundaries, 3)
    one_by_one = mx.concatenate([encode_reference(x[:, :, t : t + 1], codec.sign, codec.centroids, codec.boundaries, 3)
                                 for t in range(40)], axis=2)
    assert mx.array_equal(whole, one_by_one).item()


@pytest.mark.parametrize("tile", [16, 1024])
@pytest.mark.parametrize("length,mask", [(1, None), (5, "causal"), (3, "array")])
def test_attention_in_the_rotated_basis_equals_attention_on_dequantized_vectors(length, mask, tile, monkeypatch):
    """Also tile by tile (16 keys a tile: 5 tiles, the last one partial) with an online softmax."""
    monkeypatch.setattr(tq_attention, "KEY_TILE", tile)
    dim, heads, kv_heads, keys = 256, 8, 2, 70
    k_codec, v_codec = TurboQuantCodec(dim, 4, 0), TurboQuantCodec(dim, 3, 1)
    q = mx.random.normal((2, heads, length, dim), key=mx.random.key(1))
    k = k_codec.encode(mx.random.normal((2, kv_heads, keys, dim), key=mx.random.key(2)))
    v = v_codec.encode(mx.random.normal((2, kv_heads, keys, dim), key=mx.random.key(3)))
    if mask == "array":  # left padding of 20 keys in the second row
        mask = (mx.arange(keys) >= mx.array([0, 20])[:, None])[:, None, None]
    got = tq_reference(q, k, v, k_codec, v_codec, 0.0625, mask)
    want = mx.fast.scaled_dot_product_attention(q, k_codec.decode(k), v_codec.decode(v), scale=0.0625, mask=mask)
    assert mx.abs(got - want).max().item() < 1e-4


def test_prefill_reference_dequantizes_tile_by_tile():
    """A prefill chunk over a long packed cache never holds the whole cache as float32."""
    dim, kv_heads, keys = 256, 2, 16384
    k_codec, v_codec = TurboQuantCodec(dim, 4, 0), TurboQuantCodec(dim, 4, 1)
    k = k_codec.encode(mx.random.normal((1, kv_heads, keys, dim), key=mx.random.key(2)))
    v = v_codec.encode(mx.random.normal((1, kv_heads, keys, dim), key=mx.random.key(3)))
    q = mx.random.normal((1, 4 * kv_heads, 8, dim), key=mx.random.key(1))
    mx.eval(k, v, q)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(tq_reference(q, k, v, k_codec, v_codec, 0.0625, "causal"))
    whole_cache_float32 = 2 * kv_heads * keys * dim * 4  # keys and values
    assert mx.get_peak_memory() - before < whole_cache_float32 / 4
