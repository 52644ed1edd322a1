"""Decode attention's Metal body on the CPU emulator (rung b) against the reference, on inputs laid out
by the model's caches: Gemma 4's head dims and GQA ratios, wrapped sliding windows, left padding,
lengths that are not multiples of the key tile or chunk, cache views with strides, shuffled schedules."""

import functools

import mlx.core as mx
import numpy as np
import pytest

import metal_emu
from attention_cases import CASES, Case, full, sliding
from mlx_gemma4.kernels.decode_attention import TOLERANCE, attend, reference

pytestmark = pytest.mark.skipif(not metal_emu.CXX, reason="needs clang++-19")


def assert_matches(case: Case, launch=metal_emu.run):
    got = attend(launch, case.queries, case.keys, case.values, case.scale, case.mask)
    want = reference(case.queries, case.keys, case.values, case.scale, case.mask)
    assert got.shape == want.shape and got.dtype == want.dtype
    error = mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item()
    assert error <= TOLERANCE[case.queries.dtype], error


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
    assert_matches(CASES[name]())


@pytest.mark.parametrize("seed", [1, 2])
def test_shuffled_schedule(seed):
    assert_matches(CASES["full-512-8:1-fp16-padded"](), functools.partial(metal_emu.run, seed=seed))


def test_cache_views_are_read_through_strides():
    """E4B (8:2, d=256): keys and values a prefix of a longer buffer, as FullCache hands them out."""
    rng = np.random.default_rng(0)
    buffer = rng.standard_normal((2, 2, 2, 512, 256)).astype(np.float32)  # K/V, B, HKV, capacity, D
    keys, values = buffer[0, :, :, :203], buffer[1, :, :, :203]
    queries = mx.array(rng.standard_normal((2, 8, 1, 256)).astype(np.float32))
    got = attend(metal_emu.run, queries, keys, values, 1 / 16)
    want = reference(queries, mx.array(keys), mx.array(values), 1 / 16)
    assert mx.abs(got - want).max().item() <= TOLERANCE[mx.float32]


def test_row_without_valid_keys_gives_zeros():
    case = full(8, 1, 256, mx.float32, length=70, padding=[0, 0])
    mask = mx.array(np.array([[True] * 70, [False] * 70]))
    got = attend(metal_emu.run, case.queries, case.keys, case.values, case.scale, mask)
    assert mx.array_equal(got[1], mx.zeros_like(got[1])).item()
    assert mx.abs(got[0] - reference(case.queries, case.keys, case.values, case.scale, mask)[0]).max().item() < 1e-5


def test_gemma_scale_of_one():
    """Gemma 4 attends with scale 1.0 (q and k are RMS-normalised): large scores must not overflow."""
    case = sliding(8, 1, 256, mx.bfloat16, window=64, steps=3)
    assert_matches(Case(case.queries, case.keys, case.values, case.mask, 1.0))


def test_masked_slots_may_hold_anything():
    """Padding and empty ring slots are never read into the result, even when they hold NaN."""
    case = CASES["full-512-8:1-fp16-padded"]()
    valid = case.mask.reshape(2, 1, -1, 1)
    poisoned = [mx.where(valid, x, mx.array(float("nan"), x.dtype)) for x in (case.keys, case.values)]
    got = attend(metal_emu.run, case.queries, *poisoned, case.scale, case.mask)
    want = reference(case.queries, case.keys, case.values, case.scale, case.mask)
    assert mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item() <= TOLERANCE[mx.float16]
