"""The ladder catches bugs planted in the quantized GEMV body: a wrong unpacking gives wrong numbers, an
unclamped weight row or an unguarded output row touches memory past its buffer (the emulator crashes),
a Metal-only spelling fails the type check."""

import dataclasses
import functools

import mlx.core as mx
import pytest

import metal_check
import metal_emu
from metal_source import capture
from mlx_gemma4.kernels.quantized_matmul import TOLERANCE, error, gemv, gemv_kernel, quantized_case, reference

pytestmark = pytest.mark.skipif(not (metal_check.CLANG and metal_emu.CXX), reason="needs clang-19 and clang++-19")

# 13 weight rows: the last threadgroup of 4 overhangs by 3
CASE = dict(rows=2, k=384, n=13, dtype=mx.float32, group_size=64, bits=4)


def mutant(old: str, new: str):
    assert old in gemv_kernel.source, old
    return dataclasses.replace(gemv_kernel, name="quantized_gemv_mutant", source=gemv_kernel.source.replace(old, new), _built={})


def run(kernel, launch=metal_emu.run, k=CASE["k"], split=None):
    group, bits = CASE["group_size"], CASE["bits"]
    x, w, scales, biases = quantized_case(CASE["rows"], k, CASE["n"], CASE["dtype"], group, bits)
    got = gemv(lambda _, **call: launch(kernel, **call), x, w, scales, biases, group, bits, split)
    return error(got, reference(x, w, scales, biases, group, bits))


def test_the_real_body_passes():
    assert run(gemv_kernel) <= TOLERANCE[CASE["dtype"]]


@pytest.mark.parametrize("old,new", [
    ("and_or(word >> 8, 0x000F000Fu", "and_or(word >> 4, 0x000F000Fu"),  # codes 2 and 6 from the wrong bits
    ("0x00F000F0u, 0x64006400u), 0.0625f, -64.0f)", "0x00F000F0u, 0x64006400u), 1.0f, -1024.0f)"),  # 16c for c
])
def test_wrong_unpacking_gives_wrong_numbers(old, new):
    assert run(mutant(old, new)) > 0.01


@pytest.mark.parametrize("old,new", [
    ("total[j] += partial[g * (ROWS * M) + j * (RPS * M) + i];", "total[j] += partial[i];"),  # one simdgroup's K
    ("threadgroup_barrier(mem_flags::mem_threadgroup);", ""),  # partial sums read before they are written
])
def test_split_k_mutants_give_wrong_numbers(old, new):
    """K split over 4 simdgroups (K = 5 steps of 4 x 1024 codes, the last partial); the missing barrier
    shows under a shuffled schedule."""
    launch = functools.partial(metal_emu.run, seed=3)
    assert run(gemv_kernel, launch, k=4 * 4096 + 640, split=4) <= TOLERANCE[CASE["dtype"]]
    assert not run(mutant(old, new), launch, k=4 * 4096 + 640, split=4) <= 0.01  # NaN: poisoned memory read


@pytest.mark.parametrize("old,new", [
    ("metal::min(first + r % RPS, N - 1)", "(first + r % RPS)"),  # weight rows past N
    ("if (first + r < N) {", "{"),  # output rows past N
])
def test_out_of_bounds_crashes_the_emulator(old, new):
    with pytest.raises(metal_emu.EmulatorError):
        run(mutant(old, new))


def test_type_check_catches_a_write_to_the_weights():
    captured = []

    def record(kernel, **call):
        captured.append(capture(kernel.build("metal"), **call))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(call["output_shapes"], call["output_dtypes"])]

    run(mutant("const uint lane = thread_index_in_simdgroup;", "const uint lane = thread_index_in_simdgroup; w[0] = 0u;"), record)
    assert metal_check.check(captured[0])
