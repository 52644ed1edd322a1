"""The quantized GEMV's Metal body on the CPU emulator (rung b) and clang's type check of every generated
configuration (rung a), against the float32 definition: every format (4/8 bits x groups 32/64/128 x
float32/float16/bfloat16), 1-8 rows, shapes that are not multiples of the kernel's tiles, every launch
shape (weight rows and simdgroups per threadgroup) and the table that picks one."""

import functools

import mlx.core as mx
import pytest

import metal_check
import metal_emu
from metal_source import capture
from mlx_gemma4.kernels import quantized_matmul as qmm
from mlx_gemma4.kernels.quantized_matmul import (
    BITS, DTYPES, GROUP_SIZES, MAX_ROWS, RPS_CHOICES, SIMDGROUPS, TOLERANCE, error, gemv, geglu_reference,
    quantized_case, reference,
)

pytestmark = pytest.mark.skipif(not (metal_check.CLANG and metal_emu.CXX), reason="needs clang-19 and clang++-19")

FORMATS = [(bits, group) for bits in BITS for group in GROUP_SIZES]


def check(rows, k, n, dtype, group, bits, launch=metal_emu.run, seed=0):
    case = quantized_case(rows, k, n, dtype, group, bits, seed)
    got = gemv(launch, *case, group, bits)
    want = reference(*case, group, bits)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert error(got, want) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,group", FORMATS)
def test_every_format(bits, group, dtype):
    # K = 384: a fraction of one step (1024 codes at 4 bits, 512 at 8), so most lanes idle; N = 11: the
    # last threadgroup holds three rows, its fourth re-reads row 10 and is not written.
    check(2, 384, 11, dtype, group, bits)


@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
def test_every_row_count(rows):
    check(rows, 256, 9, mx.bfloat16, 64, 4, seed=rows)


@pytest.mark.parametrize(
    "bits,group,k,n",
    [
        (4, 128, 3 * 1024 + 640, 21),  # several steps, the last one partial; six threadgroups
        (8, 32, 2 * 512 + 32, 8),  # one lane of the last step; exactly two threadgroups
        (4, 32, 32, 1),  # one group, one row
    ],
)
def test_shapes_off_the_tiles(bits, group, k, n):
    check(3, k, n, mx.float16, group, bits)


@pytest.mark.parametrize("split", SIMDGROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_every_split_of_k(split, bits):
    """K split over 1-8 simdgroups: 2.5 steps of the whole threadgroup, so that the simdgroups hold
    different numbers of chunks and some none in the last step; 8 rows of x fill the partial sums."""
    k = 5 * split * (32 * 4 * 32 // bits) // 2
    case = quantized_case(MAX_ROWS, k, 6, mx.float32, 64, bits, seed=split)
    launch = functools.partial(metal_emu.run, seed=split)
    got = gemv(launch, *case, 64, bits, split)
    assert error(got, reference(*case, 64, bits)) <= TOLERANCE[mx.float32]


@pytest.mark.parametrize("rps", RPS_CHOICES)
@pytest.mark.parametrize("bits,group,rows,split", [(4, 64, 1, 1), (8, 32, MAX_ROWS, 2), (4, 128, 3, 4)])
def test_every_launch_shape(rps, bits, group, rows, split):
    """RPS weight rows per threadgroup with NSG simdgroups: K 2.5 steps of the whole threadgroup, N two
    and a half threadgroups (rows past N re-read, never written); 8 rows of x at RPS >= 8 give more
    (row, x row) sums than one simdgroup has threads, so the final sums are taken in turns."""
    k = 5 * split * (32 * 4 * 32 // bits) // 2
    n = 2 * rps + rps // 2 + 1
    case = quantized_case(rows, k, n, mx.float16, group, bits, seed=rps)
    got = gemv(functools.partial(metal_emu.run, seed=rps), *case, group, bits, split, rps=rps)
    assert error(got, reference(*case, group, bits)) <= TOLERANCE[mx.float16]


@pytest.mark.parametrize("rps", [1, 8, 16])
def test_fused_gate_up_launch_shapes(rps):
    """The fused gate/up GEMV (two matrices' rows per threadgroup) at other launch shapes."""
    x, w, scales, biases = quantized_case(MAX_ROWS, 1024 + 320, 2 * rps + 1, mx.float32, 64, 4, seed=rps)
    up = quantized_case(MAX_ROWS, 1024 + 320, 2 * rps + 1, mx.float32, 64, 4, seed=rps + 1)[1:]
    got = gemv(metal_emu.run, x, w, scales, biases, 64, 4, 2, up=up, rps=rps)
    assert error(got, geglu_reference(x, (w, scales, biases), up, 64, 4)) <= TOLERANCE[mx.float32]


def test_launch_shape_table(monkeypatch):
    """A rule of LAUNCH_SHAPES shapes the launches it matches (rows, K and N inside its bounds); the
    rest keep RPS 4 and the `simdgroups` rule."""
    monkeypatch.setitem(qmm.LAUNCH_SHAPES, "reference", ((2, 300, 400, 10, 20, 8, 2),))
    qmm.launch_shape.cache_clear()
    try:
        launches = []

        def record(kernel, **call):
            launches.append(dict(call["template"]))
            return metal_emu.run(kernel, **call)

        for rows, k, n, shape in [(2, 320, 13, (8, 2)), (3, 320, 13, (4, 1)), (1, 448, 13, (4, 1)), (1, 320, 9, (4, 1))]:
            assert qmm.launch_shape("reference", k, n, rows, 4) == shape
            case = quantized_case(rows, k, n, mx.float32, 64, 4)
            assert error(gemv(record, *case, 64, 4), reference(*case, 64, 4)) <= TOLERANCE[mx.float32]
            assert (launches[-1]["RPS"], launches[-1]["NSG"]) == shape
    finally:
        qmm.launch_shape.cache_clear()


def test_launch_shape_rules_are_launchable():
    """Every committed rule names a launch shape the body takes, with bounds in order."""
    for on, rules in qmm.LAUNCH_SHAPES.items():
        for most_rows, fewest_k, most_k, fewest_n, most_n, rps, split in rules:
            assert rps in qmm.RPS_CHOICES and split in qmm.SIMDGROUPS, (on, rps, split)
            assert 1 <= most_rows <= qmm.MAX_ROWS and fewest_k <= most_k and fewest_n <= most_n, on


def test_leading_dimensions_are_rows():
    """[B, L, K] activations, as the model hands them: rows are B * L, the output [B, L, N]."""
    x, w, scales, biases = quantized_case(6, 256, 16, mx.bfloat16, 64, 4)
    got = gemv(metal_emu.run, x.reshape(2, 3, 256), w, scales, biases, 64, 4)
    assert got.shape == (2, 3, 16)
    assert error(got.reshape(6, 16), reference(x, w, scales, biases, 64, 4)) <= TOLERANCE[mx.bfloat16]


def test_extreme_codes_and_signs():
    """All-zero and all-ones codes (0 and 2^BITS - 1 at every bit offset), negative scales."""
    for bits in BITS:
        x = mx.random.normal((1, 512), key=mx.random.key(3))
        weight = mx.concatenate([mx.full((2, 512), 5.0), mx.full((2, 512), -5.0), -mx.ones((1, 512))])
        ramp = mx.broadcast_to(mx.arange(512, dtype=mx.float32) % 2 * 2 - 1, (3, 512))  # +-1: all codes extreme
        w, scales, biases = mx.quantize(mx.concatenate([weight, ramp]), 64, bits)
        got = gemv(metal_emu.run, x, w, -scales, biases, 64, bits)
        assert error(got, reference(x, w, -scales, biases, 64, bits)) <= TOLERANCE[mx.float32]


@pytest.mark.parametrize("seed", [1, 5])
def test_shuffled_schedule(seed):
    check(4, 1024 + 256, 19, mx.float32, 64, 8, launch=functools.partial(metal_emu.run, seed=seed))


def sources(rows, dtype, group, bits, rps=None, split=None) -> str:
    captured = []

    def record(kernel, **call):
        captured.append(capture(kernel.build("metal"), **call))
        return [mx.zeros(shape, dtype) for shape, dtype in zip(call["output_shapes"], call["output_dtypes"])]

    gemv(record, *quantized_case(rows, 256, 8, dtype, group, bits), group, bits, split, rps=rps)
    return captured[0]


def test_configurations_typecheck_and_lint():
    """Every dtype and format at 1 and 8 rows, every row count in between at one of them (the row
    count is a loop bound, the dtype and format change the code's types and constants), and every
    RPS at two splits of K."""
    configs = [(rows, dtype, group, bits) for rows in (1, MAX_ROWS) for dtype in DTYPES for bits, group in FORMATS]
    configs += [(rows, mx.bfloat16, 64, 4) for rows in range(2, MAX_ROWS)]
    configs += [(MAX_ROWS, mx.bfloat16, 64, 4, rps, split) for rps in RPS_CHOICES for split in (2, SIMDGROUPS[-1])]
    all_sources = {sources(*config) for config in configs}
    assert len(all_sources) == len(configs)
    assert not (found := metal_check.problems(all_sources)), found
