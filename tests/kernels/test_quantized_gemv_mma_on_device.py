"""Rung (c): the matrix-unit GEMV on a real GPU against the float32 definition.

    MLX_GEMMA4_KERNELS=cuda python -m pytest tests/kernels/test_quantized_gemv_mma_on_device.py -m gpu

Every format it takes (groups 32/64/128 x float16/bfloat16 x 1-8 rows), shapes off its tiles, every launch,
Gemma 4's decode shapes and the fused gate/up GEMV. CUDA only: on Metal its MMA is the ladder's shuffled
stand-in, which no dispatch picks.
"""

import mlx.core as mx
import pytest

from mlx_gemma4.kernels import backend
from mlx_gemma4.kernels import quantized_gemv_mma as mma
from mlx_gemma4.kernels import quantized_matmul as qmm
from mlx_gemma4.kernels.kernel import launcher

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(backend() != "cuda", reason="needs MLX's CUDA backend (MLX_GEMMA4_KERNELS=cuda)")]


def check(rows, k, n, dtype, group, tiles=None, split=None, seed=0, fused=False):
    x, w, scales, biases = qmm.quantized_case(rows, k, n, dtype, group, 4, seed)
    if fused:
        up = qmm.quantized_case(rows, k, n, dtype, group, 4, seed + 1)[1:]
        got = mma.gemv(launcher("cuda"), x, w, scales, biases, group, tiles, split, up=up)
        want = qmm.geglu_reference(x, (w, scales, biases), up, group, 4)
    else:
        got = mma.gemv(launcher("cuda"), x, w, scales, biases, group, tiles, split)
        want = qmm.reference(x, w, scales, biases, group, 4)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert qmm.error(got, want) <= qmm.TOLERANCE[dtype]


@pytest.mark.parametrize("rows", range(1, qmm.MAX_ROWS + 1))
@pytest.mark.parametrize("group", qmm.GROUP_SIZES)
@pytest.mark.parametrize("dtype", mma.DTYPES, ids=str)
def test_every_format(dtype, group, rows):
    check(rows, 1536 + 128, 37, dtype, group, seed=rows)


@pytest.mark.parametrize("k,n", [(32, 1), (96, 16), (2112, 2816), (704, 2816), (5376, 33)])
def test_shapes_off_the_tiles(k, n):
    check(2, k, n, mx.bfloat16, 32)


@pytest.mark.parametrize("tiles", mma.TILES_CHOICES)
@pytest.mark.parametrize("split", mma.SIMDGROUPS)
def test_every_launch(tiles, split):
    check(1, 4096 + 512, 100, mx.bfloat16, 64, tiles, split)
    check(3, 4096 + 512, 100, mx.float16, 128, tiles, split, fused=True)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("k,n", [(5376, 2048), (5376, 21504), (21504, 5376), (16384, 5376), (1536, 262144)])
def test_gemma_shapes(k, n, rows):
    check(rows, k, n, mx.bfloat16, 64, seed=rows)


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("k,n", [(5376, 21504), (1536, 6144), (2816, 2112)])
def test_fused_gate_up(k, n, rows):
    check(rows, k, n, mx.bfloat16, 64, seed=rows, fused=True)
