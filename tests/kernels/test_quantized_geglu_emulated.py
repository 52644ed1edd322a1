"""The fused gate/up GEMV (the MLP's gelu_tanh(x @ gate.T) * (x @ up.T)) on the CPU emulator against its
float32 definition, clang's type check of its configurations, and bugs planted in it."""

import dataclasses
import functools

import mlx.core as mx
import pytest

import metal_check
import metal_emu
from metal_source import capture
from mlx_gemma4.kernels.quantized_matmul import (
    BITS, DTYPES, GROUP_SIZES, MAX_ROWS, SIMDGROUPS, TOLERANCE, error, gemv, geglu_kernel, geglu_reference,
    quantized_case,
)

pytestmark = pytest.mark.skipif(not (metal_check.CLANG and metal_emu.CXX), reason="needs clang-19 and clang++-19")


def weights(rows, k, n, dtype, group, bits, seed=0):
    """x and two weights of one format; the gate's scales tripled so that its outputs reach the GeGLU's
    saturated ends (gate >> 0 and << 0), not only its middle."""
    x, w, scales, biases = quantized_case(rows, k, n, dtype, group, bits, seed)
    up = quantized_case(rows, k, n, dtype, group, bits, seed + 100)[1:]
    return x, (w, 3 * scales, 3 * biases), up


def gap(rows, k, n, dtype, group, bits, launch=metal_emu.run, split=None, seed=0, kernel=None):
    x, gate, up = weights(rows, k, n, dtype, group, bits, seed)
    if kernel is not None:
        launch = functools.partial(lambda run, _, **call: run(kernel, **call), launch)
    got = gemv(launch, x, *gate, group, bits, split, up=up)
    want = geglu_reference(x, gate, up, group, bits)
    assert got.shape == want.shape and got.dtype == want.dtype
    return error(got, want)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUP_SIZES)
def test_every_format(bits, group):
    # K = 384: less than one step; N = 11: the last threadgroup's fourth row pair is past N.
    assert gap(2, 384, 11, mx.bfloat16, group, bits) <= TOLERANCE[mx.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
def test_dtypes_and_rows(dtype, rows):
    assert gap(rows, 256 + 64, 9, dtype, 64, 4, seed=rows) <= TOLERANCE[dtype]


@pytest.mark.parametrize("split", SIMDGROUPS[1:])
def test_split_of_k(split):
    """2.5 steps of the whole threadgroup under a shuffled schedule: each matrix's partial sums meet."""
    k = 5 * split * 1024 // 2
    assert gap(2, k, 6, mx.float32, 64, 4, functools.partial(metal_emu.run, seed=split), split) <= TOLERANCE[mx.float32]


def mutant(old: str, new: str):
    assert old in geglu_kernel.source, old
    return dataclasses.replace(geglu_kernel, name="geglu_mutant", source=geglu_kernel.source.replace(old, new), _built={})


@pytest.mark.parametrize("old,new", [
    ("#define WEIGHTS(r) ((r) < RPS ? w : up_w)", "#define WEIGHTS(r) w"),  # up rows read from the gate
    ("* total[1])", "* total[0])"),  # the gate's sums taken for up's
    ("j * (RPS * M) + i", "i"),  # both matrices' sums from the gate's slots
])
def test_mutants_give_wrong_numbers(old, new):
    assert gap(2, 384, 13, mx.float32, 64, 4, kernel=mutant(old, new)) > 0.01


def sources(rows, dtype, group, bits) -> str:
    captured = []

    def record(kernel, **call):
        captured.append(capture(kernel.build("metal"), **call))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(call["output_shapes"], call["output_dtypes"])]

    x, gate, up = weights(rows, 256, 8, dtype, group, bits)
    gemv(record, x, *gate, group, bits, up=up)
    return captured[0]


def test_configurations_typecheck_and_lint():
    configs = [(rows, dtype, group, bits) for rows in (1, MAX_ROWS) for dtype in DTYPES for bits in BITS
               for group in GROUP_SIZES]
    all_sources = {sources(*config) for config in configs}
    assert len(all_sources) == len(configs)
    assert not (found := metal_check.problems(all_sources)), found
