"""Rung (c): the quantized matmul on a real GPU through the public dispatch, against the float32 definition.

    MLX_GEMMA4_KERNELS=cuda python -m pytest tests/kernels/test_quantized_matmul_on_device.py -m gpu

The GEMV path is forced (MLX_GEMMA4_QUANTIZED_MATMUL=gemv) so that these tests also run it on Metal,
where the table defaults to MLX's op; a kernel that fails to build or to match would fall back with a
warning, which these tests turn into a failure.
"""

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_gemma4.kernels import backend
from mlx_gemma4.kernels.kernel import launcher
from mlx_gemma4.kernels import quantized_matmul as qmm
from mlx_gemma4.model.quantized_linear import QuantizedLinear, use_kernel_layers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.metal,
    pytest.mark.filterwarnings("error::mlx_gemma4.kernels.KernelFallbackWarning"),
    pytest.mark.skipif(backend() == "reference", reason="no GPU backend (set MLX_GEMMA4_KERNELS=cuda or metal)"),
]

FORMATS = [(bits, group) for bits in qmm.BITS for group in qmm.GROUP_SIZES]


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv(qmm.PATH_ENV, "gemv")


def check(rows, k, n, dtype, group, bits, seed=0):
    inputs = (*qmm.quantized_case(rows, k, n, dtype, group, bits, seed), group, bits)
    assert qmm.path(*inputs) == "gemv"
    got = qmm.quantized_matmul(*inputs)
    assert qmm.error(got, qmm.reference(*inputs)) <= qmm.TOLERANCE[dtype]


@pytest.mark.parametrize("rows", [1, 3, qmm.MAX_ROWS])
@pytest.mark.parametrize("dtype", qmm.DTYPES, ids=str)
@pytest.mark.parametrize("bits,group", FORMATS)
def test_every_format(forced, bits, group, dtype, rows):
    check(rows, 3 * 1024 + 384, 37, dtype, group, bits, seed=rows)


@pytest.mark.parametrize("rows", range(1, qmm.MAX_ROWS + 1))
def test_every_row_count(forced, rows):
    check(rows, 2048 + 64, 45, mx.bfloat16, 64, 4, seed=rows)


GEMMA = {  # (K, N) of Gemma 4 layers
    "31B gate/up": (5376, 21504),
    "31B down": (21504, 5376),
    "31B o_proj global": (16384, 5376),
    "26B-A4B router": (2816, 128),
    "E2B k_proj": (1536, 256),
    "E2B head": (1536, 262144),
}


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("shape", GEMMA)
def test_gemma_shapes(forced, shape, rows):
    check(rows, *GEMMA[shape], mx.bfloat16, 64, 4)


@pytest.mark.parametrize("split", qmm.SIMDGROUPS)
@pytest.mark.parametrize("rows", [1, 8])
def test_every_split_of_k(split, rows):
    """Each simdgroups-per-threadgroup choice (the rule picks one per shape) at 31B k_proj's shape."""
    inputs = (*qmm.quantized_case(rows, 5376, 2048, mx.bfloat16, 64, 4, seed=split), 64, 4)
    got = qmm.gemv(launcher(backend()), *inputs, split)
    assert qmm.error(got, qmm.reference(*inputs)) <= qmm.TOLERANCE[mx.bfloat16]


@pytest.mark.parametrize("rps", qmm.RPS_CHOICES)
def test_every_launch_shape(rps):
    """Each RPS (weight rows per threadgroup) at 8 rows of x and 2 simdgroups: RPS >= 8 has more final
    sums than threads; N ends in a partial threadgroup."""
    inputs = (*qmm.quantized_case(qmm.MAX_ROWS, 5376, 2 * rps + rps // 2 + 1, mx.bfloat16, 64, 4, seed=rps), 64, 4)
    got = qmm.gemv(launcher(backend()), *inputs, 2, rps=rps)
    assert qmm.error(got, qmm.reference(*inputs)) <= qmm.TOLERANCE[mx.bfloat16]


def test_prefill_path(monkeypatch):
    """Dequantize-then-matmul on 2048 rows: the weight rounds to bf16, so a looser bound."""
    monkeypatch.setenv(qmm.PATH_ENV, "dequantize")
    inputs = (*qmm.quantized_case(2048, 5376, 2048, mx.bfloat16, 64, 4), 64, 4)
    assert qmm.error(qmm.quantized_matmul(*inputs), qmm.reference(*inputs)) <= 3 * qmm.TOLERANCE[mx.bfloat16]


def test_layer_decodes_on_the_kernel(forced):
    holder = nn.Sequential(nn.Linear(2048, 512, bias=False))
    nn.quantize(holder, 64, 4)
    layer = use_kernel_layers(holder).layers[0]
    x = mx.random.normal((1, 1, 2048))
    want = qmm.gemv(launcher(backend()), x, layer.weight, layer.scales, layer.biases, 64, 4)
    assert type(layer) is QuantizedLinear and mx.array_equal(layer(x), want).item()


@pytest.mark.parametrize("rows", [1, 3, qmm.MAX_ROWS])
@pytest.mark.parametrize("shape", ["31B gate/up", "E2B gate/up", "26B-A4B gate/up"])
def test_fused_gate_up(shape, rows):
    """The MLP's fused gate/up GEMV with GeGLU, planned as the model plans it (the GEMV path forced)."""
    k, n = {"31B gate/up": (5376, 21504), "E2B gate/up": (1536, 6144), "26B-A4B gate/up": (2816, 2112)}[shape]
    x, w, scales, biases = qmm.quantized_case(rows, k, n, mx.bfloat16, 64, 4, seed=rows)
    up = qmm.quantized_case(rows, k, n, mx.bfloat16, 64, 4, seed=rows + 1)[1:]
    run = qmm.geglu_plan("gemv", backend(), x, w, scales, biases, 64, 4)
    assert run is not None
    want = qmm.geglu_reference(x, (w, scales, biases), up, 64, 4)
    assert qmm.error(run(x, w, scales, biases, *up), want) <= qmm.TOLERANCE[mx.bfloat16]
