"""The ladder catches bugs planted in the quantized GEMV body: a wrong unpacking gives wrong numbers, an
unclamped weight row or an unguarded output row touches memory past its buffer (the emulator crashes),
a Metal-only spelling fails the type check."""

import dataclasses

import mlx.core as mx
import pytest

import metal_check
import metal_emu
from metal_source import capture
from mlx_gemma4.kernels.quantized_matmul import TOLERANCE, error, gemv, gemv_kernel, quantized_case, reference

pytestmark = pytest.mark.skipif(not (metal_check.CLANG and metal_emu.CXX), reason="needs clang-19 and clang++-19")

CASE = dict(rows=2, k=384, n=11, dtype=mx.float32, group_size=64, bits=4)  # 11 rows: the last simdgroup overhangs


def mutant(old: str, new: str):
    assert old in gemv_kernel.source, old
    return dataclasses.replace(gemv_kernel, name="quantized_gemv_mutant", source=gemv_kernel.source.replace(old, new), _built={})


def run(kernel, launch=metal_emu.run):
    x, w, scales, biases = quantized_case(CASE["rows"], CASE["k"], CASE["n"], CASE["dtype"], CASE["group_size"], CASE["bits"])
    got = gemv(lambda _, **call: launch(kernel, **call), x, w, scales, biases, CASE["group_size"], CASE["bits"])
    return error(got, reference(x, w, scales, biases, CASE["group_size"], CASE["bits"]))


def test_the_real_body_passes():
    assert run(gemv_kernel) <= TOLERANCE[CASE["dtype"]]


def test_wrong_unpacking_gives_wrong_numbers():
    assert run(mutant("const uint high = low >> 16;", "const uint high = low >> 12;")) > 0.01


@pytest.mark.parametrize("old,new", [
    ("metal::min(first + r, N - 1)", "(first + r)"),  # weight rows past N
    ("lane == 0 && first + r < N", "lane == 0"),  # output rows past N
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
