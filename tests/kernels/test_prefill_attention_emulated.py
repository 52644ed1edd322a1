"""Prefill attention's Metal body on the CPU emulator (rung b) against the reference, on chunks laid out
by the model's caches: Gemma 4's head dims and GQA ratios, wrapped sliding windows, left padding, lengths
that are not multiples of the row tile or key step, strided views, shuffled schedules. And the mask the
kernel computes from positions is the mask the model builds."""

import functools

import mlx.core as mx
import numpy as np
import pytest

import metal_emu
from prefill_cases import CHUNKS, Chunk, full
from mlx_gemma4.kernels import backend, scaled_dot_product_attention
from mlx_gemma4.kernels.prefill_attention import TOLERANCE, CausalMask, attend, reference

needs_emulator = pytest.mark.skipif(not metal_emu.CXX, reason="needs clang++-19")


def error(chunk: Chunk, got) -> float:
    want = reference(chunk.queries, chunk.keys, chunk.values, chunk.scale, chunk.mask)
    assert got.shape == want.shape and got.dtype == want.dtype
    return mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()


@pytest.mark.parametrize("name", CHUNKS)
def test_mask_rules_are_the_model_mask(name):
    chunk = CHUNKS[name]()
    length, n_keys = chunk.queries.shape[2], chunk.keys.shape[2]
    ours = chunk.mask.dense(length, n_keys)
    assert mx.array_equal(mx.broadcast_to(ours, chunk.model_mask.shape), chunk.model_mask).item()


def test_reference_is_mlx_attention_with_the_model_mask():
    chunk = CHUNKS["sliding-256-2:1-fp16-padded"]()
    as_float = [x.astype(mx.float32) for x in (chunk.queries, chunk.keys, chunk.values)]
    mlx = mx.fast.scaled_dot_product_attention(*as_float, scale=chunk.scale, mask=chunk.model_mask)
    got = reference(*as_float, chunk.scale, chunk.mask)
    assert mx.abs(got - mlx).max().item() < 1e-5


@pytest.mark.skipif(backend() != "reference", reason="CPU behaviour")
@pytest.mark.parametrize("name", ["sliding-256-8:1-bf16-wrapped", "full-512-8:1-fp16-padded"])
def test_model_hook_on_cpu_is_mlx_attention_with_the_model_mask(name):
    chunk = CHUNKS[name]()
    got = scaled_dot_product_attention(chunk.queries, chunk.keys, chunk.values, chunk.scale, chunk.mask)
    want = mx.fast.scaled_dot_product_attention(chunk.queries, chunk.keys, chunk.values, scale=chunk.scale,
                                                mask=chunk.model_mask)
    assert mx.array_equal(got, want).item()


@needs_emulator
@pytest.mark.parametrize("name", CHUNKS)
def test_matches_reference(name):
    chunk = CHUNKS[name]()
    assert error(chunk, attend(metal_emu.run, chunk.queries, chunk.keys, chunk.values, chunk.scale, chunk.mask)) \
        <= TOLERANCE[chunk.queries.dtype]


@needs_emulator
def test_shuffled_schedule():
    chunk = CHUNKS["sliding-256-8:1-bf16-wrapped"]()
    got = attend(functools.partial(metal_emu.run, seed=3), chunk.queries, chunk.keys, chunk.values, chunk.scale,
                 chunk.mask)
    assert error(chunk, got) <= TOLERANCE[mx.bfloat16]


@needs_emulator
def test_strided_views_and_scale_of_one():
    """Queries as the model hands them (a transpose of the projection), keys and values a prefix of a
    longer buffer as FullCache hands them out; Gemma 4's scale 1.0."""
    rng = np.random.default_rng(0)
    projected = rng.standard_normal((2, 7, 4, 256)).astype(np.float32) / 4  # B, L, HQ, D
    buffer = rng.standard_normal((2, 2, 2, 64, 256)).astype(np.float32) / 4  # K/V, B, HKV, capacity, D
    views = [projected.transpose(0, 2, 1, 3), buffer[0, :, :, :30], buffer[1, :, :, :30]]

    def launch_on_views(kernel, inputs, **call):  # the emulator keeps a numpy view's strides
        return metal_emu.run(kernel, inputs=views + inputs[3:], **call)

    queries, keys, values = (mx.array(x) for x in views)
    mask = CausalMask(None, mx.array([0, 9], mx.int32))
    got = attend(launch_on_views, queries, keys, values, 1.0, mask)
    want = reference(queries, keys, values, 1.0, mask)
    assert mx.abs(got - want).max().item() <= TOLERANCE[mx.float32]


@needs_emulator
def test_slots_no_query_sees_may_hold_anything():
    """Padding is never read into a result that should not see it, even when it holds NaN."""
    chunk = full(8, 1, 256, mx.float16, prompt=5, length=6, padding=[0, 8])
    padding = mx.arange(chunk.keys.shape[2]) < mx.array([[0], [8]])  # row 1: its first 8 keys are padding
    poisoned = [mx.where(padding[:, None, :, None], mx.array(float("nan"), x.dtype), x)
                for x in (chunk.keys, chunk.values)]
    got = attend(metal_emu.run, chunk.queries, *poisoned, chunk.scale, chunk.mask)
    # padding queries (row 1, positions < 8) see only their own key, NaN here: compare the others
    want = reference(chunk.queries, chunk.keys, chunk.values, chunk.scale, chunk.mask)
    real = (mx.arange(5, 11) >= mx.array([[0], [8]]))[:, None, :, None]  # queries at positions 5..10
    diff = mx.where(real, mx.abs(got.astype(mx.float32) - want.astype(mx.float32)), 0.0)
    assert not mx.isnan(mx.where(real, got, 0.0)).any().item()
    assert diff.max().item() <= TOLERANCE[mx.float16]
