"""TurboQuant kernels on the verification ladder: the Metal source of every configuration the presets
use type-checks and lints (rung a); the encode kernel gives the reference's rows bit for bit and the
fused decode attention matches its reference on the emulator (rung b), shuffled schedules included;
planted bugs are caught."""

import dataclasses
import functools

import mlx.core as mx
import numpy as np
import pytest

import metal_check
import metal_emu
from metal_source import capture
from mlx_gemma4.kernels import tq_attention, tq_encode
from mlx_gemma4.turboquant.codec import TurboQuantCodec

pytestmark = pytest.mark.skipif(not (metal_check.CLANG and metal_emu.CXX), reason="needs clang-19 and clang++-19")

# (head dim, query heads per kv head) of the presets' layers, as in test_metal_sources
SHAPES = [(256, 2), (256, 4), (256, 8), (512, 4), (512, 8)]


def codecs(dim, k_bits, v_bits):
    return TurboQuantCodec(dim, k_bits, 10), TurboQuantCodec(dim, v_bits, 11)


def attention_case(dim, group, k_bits, v_bits, length, padding=(0, 0), dtype=mx.float32, seed=0):
    k_codec, v_codec = codecs(dim, k_bits, v_bits)
    keys = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((2, 2 * group, 1, dim), key=keys[0]).astype(dtype)
    k = k_codec.encode(mx.random.normal((2, 2, length, dim), key=keys[1]).astype(dtype))
    v = v_codec.encode(mx.random.normal((2, 2, length, dim), key=keys[2]).astype(dtype))
    mask = mx.arange(length)[None] >= mx.array(padding)[:, None]
    return q, k, v, k_codec, v_codec, mask


def attention_error(case, launch=metal_emu.run, scale=1.0):
    q, k, v, k_codec, v_codec, mask = case
    got = tq_attention.attend(launch, q, k, v, k_codec, v_codec, scale, mask)
    want = tq_attention.reference(q, k, v, k_codec, v_codec, scale, mask[:, None, None])
    assert got.shape == want.shape and got.dtype == q.dtype
    return mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()


@pytest.mark.parametrize("dim", [256, 512])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [mx.bfloat16, pytest.param(mx.float32, marks=pytest.mark.slow)], ids=["bf16", "f32"])
def test_encode_kernel_equals_reference(dim, bits, dtype):
    """Codes as the reference's except on a boundary to float rounding; stored norms to float rounding."""
    codec = TurboQuantCodec(dim, bits, 3)
    x = mx.random.normal((1, 2, 7, dim), key=mx.random.key(bits)).astype(dtype) * 3  # 14 rows: a spare simdgroup
    x = mx.concatenate([x, mx.zeros((1, 2, 1, dim), dtype)], axis=2)  # a zero vector: norm 0, no NaN
    args = (codec.sign, codec.centroids, codec.boundaries, bits)
    got = tq_encode.run(metal_emu.run, x, *args)
    assert tq_encode.differences(got, x, *args) is None
    want = tq_encode.reference(x, *args)
    assert mx.mean(got[..., : codec.words] == want[..., : codec.words]).item() > 0.99  # ties are rare


def test_encode_kernel_gives_a_token_the_same_row_in_a_chunk_or_alone():
    """Prefill chunks and decode steps write identical rows: the kernel encodes each vector on its own."""
    codec = TurboQuantCodec(256, 4, 1)
    x = mx.random.normal((1, 2, 6, 256), key=mx.random.key(5)).astype(mx.bfloat16)
    args = (codec.sign, codec.centroids, codec.boundaries, 4)
    whole = tq_encode.run(metal_emu.run, x, *args)
    alone = mx.concatenate([tq_encode.run(metal_emu.run, x[:, :, t : t + 1], *args) for t in range(6)], axis=2)
    assert mx.array_equal(whole, alone).item()


@pytest.mark.parametrize(
    "dim,group,k_bits,v_bits,length,padding",
    [
        (512, 8, 4, 4, 300, (0, 7)),  # 31B global layers, left padding
        (512, 4, 4, 3, 131, (0, 0)),
        (256, 2, 3, 3, 70, (3, 0)),  # 26B sliding layers
        (256, 8, 2, 4, 200, (0, 0)),  # E2B
        (256, 6, 4, 2, 90, (0, 4)),  # 3 heads a simdgroup, 2 simdgroups across the group, 2 splitting keys
        (512, 3, 2, 3, 75, (2, 0)),  # 3 heads a simdgroup, 4 simdgroups splitting keys
    ],
)
def test_decode_attention_matches_reference(dim, group, k_bits, v_bits, length, padding):
    assert attention_error(attention_case(dim, group, k_bits, v_bits, length, padding)) <= tq_attention.TOLERANCE


def test_long_rows_at_gemma_scores_within_tolerance_of_a_float64_reference():
    """D=512 over 4096 keys, float32 queries unscaled (scores with std ~22, as Gemma 4's attention scale
    of 1.0 gives): there the float32 reference's own rounding (its dense Hadamard matmuls) is 0.6-1.2e-4,
    so the GPU tests compare such rows against the reference in float64, which the kernel is within
    TOLERANCE of."""
    q, k, v, k_codec, v_codec, mask = attention_case(512, 8, 4, 4, 4096)
    got = tq_attention.attend(metal_emu.run, q, k, v, k_codec, v_codec, 1.0, mask)
    want = tq_attention.reference(q.astype(mx.float64), k, v, k_codec, v_codec, 1.0, mask[:, None, None])
    assert want.dtype == mx.float64
    assert mx.abs(got - want).max().item() <= tq_attention.TOLERANCE


@pytest.mark.parametrize("dim,group,heads,splits", [(512, 8, 4, 2), (256, 2, 2, 4), (256, 8, 4, 2), (256, 6, 3, 2),
                                                    (512, 3, 3, 4)])
def test_heads_per_simdgroup(dim, group, heads, splits):
    """The launches the cases above run: each key's codes decoded once for up to 4 heads (registers)."""
    templates = []

    def record(kernel, **call):
        templates.append(dict(call["template"]))
        return [mx.zeros(s, d) for s, d in zip(call["output_shapes"], call["output_dtypes"])]

    q, k, v, k_codec, v_codec, mask = attention_case(dim, group, 4, 4, 8)
    tq_attention.attend(record, q, k, v, k_codec, v_codec, 1.0, mask)
    assert (templates[0]["HPS"], templates[0]["NK"]) == (heads, splits)


def test_bf16_queries_and_gemma_scale():
    case = attention_case(256, 4, 4, 4, 90, dtype=mx.bfloat16)
    assert attention_error(case) <= tq_attention.ROUNDED_TOLERANCE  # the output is rounded to bf16


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_shuffled_schedule(seed):
    case = attention_case(512, 8, 4, 3, 150, (0, 5))
    assert attention_error(case, functools.partial(metal_emu.run, seed=seed)) <= tq_attention.TOLERANCE


def test_cache_views_are_read_through_strides():
    """Rows a prefix of a longer buffer, as QuantizedFullCache hands them out."""
    q, k, v, k_codec, v_codec, mask = attention_case(512, 4, 4, 4, 256)
    k_view, v_view = k[:, :, :203], v[:, :, :203]
    got = tq_attention.attend(metal_emu.run, q, k_view, v_view, k_codec, v_codec, 1.0, None)
    want = tq_attention.reference(q, k_view, v_view, k_codec, v_codec, 1.0, None)
    assert mx.abs(got - want).max().item() <= tq_attention.TOLERANCE


def recent_case(padding, loud=1.0, rows=1, dtype=mx.float32):
    """The newest 24 keys read in full precision (their packed copies hidden), `loud` times longer; the
    masks' `rows - 1` earlier query rows see exactly what the last one does not."""
    q, k, v, k_codec, v_codec, mask = attention_case(256, 4, 4, 3, 170, padding, dtype)
    window, length = 24, 170
    keys = mx.random.split(mx.random.key(9), 2)
    visible = (mx.arange(window) >= mx.array([0, 5])[:, None])[:, None, None]
    older = (mx.arange(length) < length - window)[None, None, None]
    last_row = lambda x: mx.concatenate([mx.repeat(~x, rows - 1, axis=2), x], axis=2)
    recent = tq_attention.Recent(
        (mx.random.normal((2, 2, window, 256), key=keys[0]) * loud).astype(dtype),
        mx.random.normal((2, 2, window, 256), key=keys[1]).astype(dtype),
        packed_mask=last_row(older),
        mask=last_row(visible),
    )
    return q, k, v, k_codec, v_codec, mask, recent


def recent_error(case, launch=metal_emu.run, scale=1.0, kernel_recent=None):
    """The kernel's output and its max error against the reference (in float64 for float32 queries: at
    loud scores the float32 reference's own rounding nears TOLERANCE); `kernel_recent` hands the kernel
    the same window in another layout."""
    q, k, v, k_codec, v_codec, mask, recent = case
    got = tq_attention.attend(launch, q, k, v, k_codec, v_codec, scale, mask, kernel_recent or recent)
    exact = q.astype(mx.float64) if q.dtype == mx.float32 else q
    want = tq_attention.reference(exact, k, v, k_codec, v_codec, scale, mask[:, None, None], recent)
    return got, mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()


@pytest.mark.parametrize("padding", [(0, 0), (0, 150)], ids=["full", "a row with only recent keys"])
def test_recent_window_merges_with_the_packed_keys(padding):
    """The combine pass attends the recent window itself and merges it as more partials (log-sum-exp)."""
    case = recent_case(padding)
    q, k, v, k_codec, v_codec, mask, recent = case
    got, error = recent_error(case)
    assert error <= tq_attention.TOLERANCE
    # the same attention over all keys dequantized and the recent ones appended
    length = k.shape[2]
    packed = mask[:, None, None] & recent.packed_mask
    all_k = mx.concatenate([k_codec.decode(k), recent.keys], axis=2)
    all_v = mx.concatenate([v_codec.decode(v), recent.values], axis=2)
    all_mask = mx.concatenate([mx.broadcast_to(packed, (2, 1, 1, length)), recent.mask], axis=-1)
    plain = mx.fast.scaled_dot_product_attention(q, all_k, all_v, scale=1.0, mask=all_mask)
    assert mx.abs(got - plain).max().item() <= tq_attention.TOLERANCE


def test_recent_window_absent_or_alone_in_a_row_read_through_strides():
    """Row 0 sees no recent key (only packed ones), row 1 only recent keys; the kernel reads the recent
    keys in [B, R, HKV, D] memory, the values in [B, HKV, D, R] and the masks every other element,
    and the masks' last query rows decide."""
    q, k, v, k_codec, v_codec, mask, recent = recent_case((0, 150), rows=3)
    visible = np.array(recent.mask)
    visible[0, :, -1] = False
    recent = recent._replace(mask=mx.array(visible))
    assert not (mask[1] & recent.packed_mask[..., -1, :]).any().item() and visible[1, :, -1].any()
    keys_t = np.ascontiguousarray(np.array(recent.keys).transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    values_t = np.ascontiguousarray(np.array(recent.values).transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    spread = np.zeros((2, 1, 3, 48), np.bool_)
    spread[..., ::2] = visible
    hidden = np.zeros((1, 1, 3, 340), np.bool_)
    hidden[..., ::2] = np.array(recent.packed_mask)
    strided = recent._replace(keys=keys_t, values=values_t, mask=spread[..., ::2], packed_mask=hidden[..., ::2])
    _, error = recent_error((q, k, v, k_codec, v_codec, mask, recent), kernel_recent=strided, scale=0.1)
    assert error <= tq_attention.TOLERANCE


def test_recent_window_in_bfloat16():
    """The model's dtypes: bfloat16 queries and recent keys/values, a bfloat16 output."""
    got, error = recent_error(recent_case((0, 5), dtype=mx.bfloat16), scale=0.1)
    assert got.dtype == mx.bfloat16 and error <= tq_attention.ROUNDED_TOLERANCE


def test_recent_window_costs_no_mlx_op():
    """The two launches take the window's arrays as they are: no MLX op attends or hides it."""
    calls = []

    def record(kernel, **call):
        calls.append((kernel.name, call["inputs"]))
        return [mx.zeros(s, d) for s, d in zip(call["output_shapes"], call["output_dtypes"])]

    q, k, v, k_codec, v_codec, mask, recent = recent_case((0, 5))
    tq_attention.attend(record, q, k, v, k_codec, v_codec, 1.0, mask, recent)
    assert [name for name, _ in calls] == ["tq_attention_partial", "tq_attention_combine"]
    (_, partial), (_, combine) = calls
    assert any(x is recent.packed_mask for x in partial)
    assert all(any(x is y for x in combine) for y in (q, recent.keys, recent.values, recent.mask))


RECENT_BUGS = {  # (old, new, how much longer the recent keys are, scale, recent mask rows)
    "recent output without its weight": ("x += w_recent[i] * recent_o[i * D + d];", "x += recent_o[i * D + d];", 1.0,
                                         1.0, 1),
    "recent sum left out of the normalizer": ("l_all += w_recent[i] * recent_ml[2 * i + 1];", "", 1.0, 1.0, 1),
    # harmless until the recent scores exceed the packed ones by ~88 (exp overflows): 10x keys, ~100
    "recent max left out": ("m_all = metal::max(m_all, recent_ml[2 * i]);", "", 10.0, 1.0, 1),
    "recent scores without the scale": ("q_scale[0] * 1.44269504f", "1.44269504f", 1.0, 0.1, 1),
    "recent scores in natural units": ("q_scale[0] * 1.44269504f", "q_scale[0]", 1.0, 1.0, 1),
    "recent m written in log2 units": ("recent_ml[2 * sg] = rm * 0.693147181f;", "recent_ml[2 * sg] = rm;", 1.0, 1.0,
                                       1),
    "a masked recent key counted": ("if (!r_mask[", "if (false && !r_mask[", 1.0, 1.0, 1),
    "the first query row's visibility read": ("(r_mask_shape[2] - 1) * r_mask_strides[2]", "0", 1.0, 1.0, 3),
    "every head reads kv head 0's recent keys": ("(head / G) * r_k_strides[1]", "0", 1.0, 1.0, 1),
    "recent partial not rescaled": ("acc[c] = acc[c] * rescale + p * x;", "acc[c] = acc[c] + p * x;", 1.0, 1.0, 1),
    "packed copies of the recent keys not hidden": ("(!HIDDEN || hidden[", "(true || hidden[", 1.0, 1.0, 1),
    "the first query row's hidden keys read": ("(hidden_shape[2] - 1) * hidden_strides[2]", "0", 1.0, 1.0, 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("bug", RECENT_BUGS)
def test_planted_recent_bugs_are_caught(bug):
    old, new, loud, scale, rows = RECENT_BUGS[bug]
    which = "partial" if "hidden" in old else "combine"
    broken = mutant(getattr(tq_attention, f"{which}_kernel"), old, new)
    case = recent_case((0, 0), loud, rows)
    # unbroken, the case passes (the 10x keys' scores, std ~160, cost float32 ~1.2e-4 of exp's argument)
    assert recent_error(case, scale=scale)[1] <= loud * tq_attention.TOLERANCE
    _, error = recent_error(case, functools.partial(_seeded_swap, broken, seed=1), scale)
    assert not error <= 100 * tq_attention.TOLERANCE  # NaN counts as caught


def test_masked_slots_holding_nan_contribute_nothing():
    q, k, v, k_codec, v_codec, mask = attention_case(256, 2, 4, 4, 80)
    v = np.array(v)
    v[:, :, :5, -1] = np.array([np.nan], np.float32).view(np.uint32)  # NaN norms in masked slots
    mask = mx.arange(80)[None] >= 5
    got = tq_attention.attend(metal_emu.run, q, k, mx.array(v), k_codec, v_codec, 1.0, mask)
    assert not mx.any(mx.isnan(got)).item()


def sources(dim, group, k_bits, v_bits, masked) -> list:
    captured = []

    def record(kernel, **call):
        captured.append(capture(kernel.build("metal"), **call))
        return [mx.zeros(s, d) for s, d in zip(call["output_shapes"], call["output_dtypes"])]

    k_codec, v_codec = codecs(dim, k_bits, v_bits)
    rows = mx.zeros((1, 1, 100, k_codec.words + 1), mx.uint32)
    v_rows = mx.zeros((1, 1, 100, v_codec.words + 1), mx.uint32)
    mask = mx.ones((1, 100), mx.bool_) if masked else None
    q = mx.zeros((1, group, 1, dim))
    tq_attention.attend(record, q, rows, v_rows, k_codec, v_codec, 1.0, mask)
    if masked:  # a recent window hides its packed copies, so it comes with a mask
        window = mx.zeros((1, 1, 16, dim))
        recent = tq_attention.Recent(window, window, mx.ones((1, 1, 1, 100), mx.bool_), mx.ones((1, 1, 1, 16), mx.bool_))
        tq_attention.attend(record, q.astype(mx.bfloat16), rows, v_rows, k_codec, v_codec, 1.0, mask, recent)
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        tq_encode.run(record, mx.zeros((3, dim), dtype), k_codec.sign, k_codec.centroids, k_codec.boundaries, k_bits)
    return captured


def test_every_configuration_typechecks_and_lints():
    configs = [(dim, group, k, v, masked) for dim, group in SHAPES for k, v in ((4, 4), (4, 3), (3, 2))
               for masked in (True, False)]
    all_sources = sorted({src for config in configs for src in sources(*config)})
    errors = [e for e in map(metal_check.check, all_sources) if e]
    assert not errors, "\n".join(errors)[:4000]
    assert not [problem for src in all_sources for problem in metal_check.lint(src)]


def mutant(kernel, old: str, new: str):
    assert old in kernel.source, old
    return dataclasses.replace(kernel, name=kernel.name + "_mutant", source=kernel.source.replace(old, new), _built={})


def swapping(replacement):
    def launch(kernel, **call):
        return metal_emu.run(replacement if kernel.name + "_mutant" == replacement.name else kernel, **call)

    return launch


ENCODE_BUGS = {
    "missing barrier after a cross-lane stage": ("        threadgroup_barrier(mem_flags::mem_threadgroup);\n    }",
                                                 "    }"),
    "3-bit high plane shifted": ("(w - D / 16) * 32", "(w - D / 16) * 32 + 1"),
    "high plane counted in the norm": ("if (!high) {", "if (true) {"),
    "norm of the unsigned input": ("squares += y[c] * y[c];", "squares += y[c];"),
}


@pytest.mark.slow
@pytest.mark.parametrize("bug", ENCODE_BUGS)
def test_planted_encode_bugs_are_caught(bug):
    old, new = ENCODE_BUGS[bug]
    codec = TurboQuantCodec(512, 3, 3)
    x = mx.random.normal((8, 512))
    args = (codec.sign, codec.centroids, codec.boundaries, 3)
    got = tq_encode.run(swapping(mutant(tq_encode.encode_kernel, old, new)), x, *args)
    assert tq_encode.differences(got, x, *args) is not None


ATTENTION_BUGS = {
    "value codebook read as the key codebook": ("partial", "lut[16 + TQ_CODE(v + row, VB", "lut[TQ_CODE(v + row, VB"),
    "norm word one off": ("partial", "key * k_norm_strides[2] + WK]", "key * k_norm_strides[2] + WK - 1]"),
    "lane's queries on strided coordinates": ("partial", "* D + lane * N + c]", "* D + c * 32 + lane]"),
    "lane's codes read from its word's start": ("partial", ">> (lane * (N * (W)) % 32 + ", ">> ("),
    "value norm left out": ("partial", "weight[h] = s[t][h] * norm;", "weight[h] = s[t][h];"),
    "m written in log2 units": ("partial", "m[h] * 0.693147181f", "m[h]"),
    "queries and codebooks loaded without a barrier": (
        "partial", "    }\n    threadgroup_barrier(mem_flags::mem_threadgroup);\n    for (int h = 1; h < D; h <<= 1) {",
        "    }\n    for (int h = 1; h < D; h <<= 1) {"),
    "query signs dropped": ("partial", " * q_sign[i % D];", ";"),
    "query rotation stage without a barrier": ("partial",
                                               "            rotated[i + h] = a - c;\n        }\n        threadgroup_barrier(mem_flags::mem_threadgroup);",
                                               "            rotated[i + h] = a - c;\n        }"),
    "output rotation stage without a barrier": ("combine", "            o[i + h] = a - c;\n        }\n        threadgroup_barrier(mem_flags::mem_threadgroup);",
                                                "            o[i + h] = a - c;\n        }"),
    "output signs dropped": ("combine", " * factor * v_sign[d]", " * factor"),
}


@pytest.mark.slow
@pytest.mark.parametrize("bug", ATTENTION_BUGS)
def test_planted_attention_bugs_are_caught(bug):
    which, old, new = ATTENTION_BUGS[bug]
    broken = mutant(getattr(tq_attention, f"{which}_kernel"), old, new)
    case = attention_case(256, 4, 4, 3, 100, (0, 3))
    try:
        error = attention_error(case, functools.partial(_seeded_swap, broken, seed=3))
    except metal_emu.EmulatorError:
        return
    assert error > tq_attention.TOLERANCE


def _seeded_swap(replacement, kernel, seed, **call):
    return metal_emu.run(replacement if kernel.name + "_mutant" == replacement.name else kernel, seed=seed, **call)
