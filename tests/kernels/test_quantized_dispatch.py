"""The quantized matmul's dispatch table, its override, the fallback, and the model's layers that use it."""

import warnings

import mlx.core as mx
import mlx.nn as nn
import pytest

from tests.tiny import save_causal_lm
from benchmarks.pair import reduced_preset
from mlx_gemma4 import load_model
from mlx_gemma4.convert import convert
from mlx_gemma4.kernels import ENV, KernelFallbackWarning, kernel
from mlx_gemma4.kernels import quantized_matmul as qmm
from mlx_gemma4.model.quantized_linear import QuantizedEmbedding, QuantizedLinear
from mlx_gemma4.presets import random_model

ON_CPU = not (mx.metal.is_available() or mx.cuda.is_available())


def case(rows, bits=4, group=64, k=256, n=24, dtype=mx.float32):
    return (*qmm.quantized_case(rows, k, n, dtype, group, bits), group, bits)


def layer(rows, k, n, bits=4, group=64, dtype=mx.bfloat16):
    """Inputs of a layer's shape, never computed (the dispatch reads shapes only)."""
    return (mx.zeros((rows, k), dtype), mx.zeros((n, k * bits // 32), mx.uint32), mx.zeros((n, k // group), dtype),
            mx.zeros((n, k // group), dtype), group, bits)


# (K, N) of Gemma 4 layers, with their 4-bit group-64 bytes
Q_31B = (5376, 8192)  # 24.8 MB
GATE_31B = (5376, 21504)  # 65 MB
KV_31B = (5376, 4096)  # 12.4 MB
K_31B = (5376, 2048)  # 6.2 MB
Q_26B = (2816, 4096)  # 6.5 MB
GATE_E2B = (1536, 6144)  # 5.3 MB
Q_E2B = (1536, 2048)  # 1.8 MB
K_E2B = (1536, 256)  # 0.2 MB


@pytest.mark.parametrize(
    "rows,shape,expected",
    [
        # 1 row: ours from ~25 MB (the 31B projections, MLP and heads)
        (1, Q_31B, "gemv"), (1, GATE_31B, "gemv"), (1, (5376, 262144), "gemv"), (1, KV_31B, "mlx"),
        (1, K_E2B, "mlx"),
        # 2-3 rows: from ~10 MB; 4-7 rows: from ~6 MB
        (2, KV_31B, "gemv"), (3, KV_31B, "gemv"), (2, K_31B, "mlx"), (3, Q_26B, "mlx"),
        (4, K_31B, "gemv"), (7, Q_26B, "gemv"), (4, GATE_E2B, "mlx"), (7, Q_E2B, "mlx"),
        # 8 rows and more: MLX's matmul kernel, until dequantize + matmul wins
        (8, GATE_31B, "mlx"), (128, GATE_31B, "mlx"), (256, GATE_31B, "dequantize"), (4096, Q_31B, "dequantize"),
        (1024, Q_E2B, "mlx"), (2048, Q_E2B, "dequantize"), (2048, (256, 1536), "mlx"),
    ],
)
def test_cuda_rule(monkeypatch, rows, shape, expected):
    monkeypatch.setenv(ENV, "cuda")
    monkeypatch.delenv(qmm.PATH_ENV, raising=False)
    assert qmm.path(*layer(rows, *shape)) == expected


@pytest.mark.parametrize("on", ["metal", "reference"])
@pytest.mark.parametrize("rows", [1, 4, 2048])
def test_mlx_everywhere_else(monkeypatch, on, rows):
    monkeypatch.setenv(ENV, on)
    monkeypatch.delenv(qmm.PATH_ENV, raising=False)
    assert qmm.path(*layer(rows, *GATE_31B)) == "mlx"


def test_cuda_rule_keeps_mlx_for_inputs_the_gemv_does_not_take(monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    monkeypatch.delenv(qmm.PATH_ENV, raising=False)
    assert qmm.path(*layer(1, *GATE_31B, bits=3)) == "mlx"
    assert qmm.path(*layer(1, *GATE_31B)[:3], None, 64, 4) == "mlx"  # no biases


def test_split_grows_for_short_n():
    """How many simdgroups split K, at Gemma 4's shapes: none for the long N that fill the GPU, more for
    short N, never more than the steps K holds."""
    assert qmm.simdgroups(*GATE_31B, 4) == qmm.simdgroups(5376, 262144, 4) == 1
    assert qmm.simdgroups(*Q_31B, 4) == 2  # 2048 threadgroups
    assert qmm.simdgroups(21504, 5376, 4) == qmm.simdgroups(*K_31B, 4) == 4
    assert qmm.simdgroups(*K_E2B, 4) == 1  # K is 1.5 steps
    assert qmm.simdgroups(*K_E2B, 8) == 2  # 8 bits: 3 steps of 512 codes


def test_override(monkeypatch):
    monkeypatch.setenv(ENV, "metal")
    monkeypatch.setenv(qmm.PATH_ENV, "gemv")
    assert qmm.path(*case(3)) == "gemv"
    assert qmm.path(*case(9)) == "mlx"  # more rows than the GEMV takes
    assert qmm.path(*case(3, bits=3, group=64)) == "mlx"  # a format it does not take
    monkeypatch.setenv(ENV, "reference")
    assert qmm.path(*case(3)) == "mlx"  # no GPU kernel to force
    monkeypatch.setenv(qmm.PATH_ENV, "dequantize")
    assert qmm.path(*case(3)) == "dequantize"
    monkeypatch.setenv(qmm.PATH_ENV, "fast")
    with pytest.raises(ValueError, match="gemv, dequantize, mlx or auto"):
        qmm.path(*case(3))


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 128)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_paths_agree_with_the_definition(monkeypatch, bits, group, dtype):
    """MLX's op and dequantize-then-matmul against the float32 definition (the GEMV: emulator tests).
    Tolerances: dequantize rounds the weight to the scales' dtype; MLX's CPU op accumulates bf16 in
    low precision."""
    monkeypatch.setenv(ENV, "reference")
    inputs = case(40, bits, group, k=512, dtype=dtype)
    want = qmm.reference(*inputs)
    for path, tolerance in (("dequantize", 3 * qmm.TOLERANCE[dtype]), ("mlx", 0.3 if dtype == mx.bfloat16 else 1e-5)):
        monkeypatch.setenv(qmm.PATH_ENV, path)
        assert qmm.error(qmm.quantized_matmul(*inputs), want) <= tolerance, path


@pytest.mark.skipif(not ON_CPU, reason="CPU-only behaviour")
def test_unbuildable_gemv_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    monkeypatch.setenv(qmm.PATH_ENV, "gemv")
    monkeypatch.setattr(kernel, "_verdicts", {})
    inputs = case(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [qmm.quantized_matmul(*inputs) for _ in range(2)]
    assert [w.category for w in caught] == [KernelFallbackWarning]
    assert all(mx.array_equal(out, qmm.mlx_matmul(*inputs)).item() for out in outputs)


def test_models_keep_mlx_layers_unless_asked(monkeypatch):
    monkeypatch.delenv(qmm.PATH_ENV, raising=False)
    model = random_model(reduced_preset("E2B", layers=2, vocab=512), bits=4, dtype=mx.float32)
    layers = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert layers and not [m for m in layers if type(m) in (QuantizedLinear, QuantizedEmbedding)]


def test_random_model_uses_our_layers(monkeypatch):
    monkeypatch.setenv(qmm.PATH_ENV, "auto")
    model = random_model(reduced_preset("E2B", layers=2, vocab=512), bits=4, dtype=mx.float32)
    layers = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert layers and all(type(m) in (QuantizedLinear, QuantizedEmbedding) for m in layers)


def test_checkpoint_loads_into_our_layers_with_unchanged_names(tmp_path, monkeypatch):
    """A 4-bit conversion loads into our layers, and computes what nn.QuantizedLinear computes
    (on the CPU every path is MLX's op)."""
    monkeypatch.setenv(qmm.PATH_ENV, "auto")
    source = save_causal_lm("31b", tmp_path / "hf")
    folder = convert(source, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32, dtype="float32")
    model = load_model(folder)
    ours = [m for _, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]
    assert ours and not [m for _, m in model.named_modules() if type(m) in (nn.QuantizedLinear, nn.QuantizedEmbedding)]
    ids = mx.array([[1, 5, 9, 2]])
    logits = model(ids)
    for _, module in model.named_modules():  # back to mlx.nn's classes, same arrays
        for name, child in list(module.children().items()):
            if type(child) in (QuantizedLinear, QuantizedEmbedding):
                plain = {QuantizedLinear: nn.QuantizedLinear, QuantizedEmbedding: nn.QuantizedEmbedding}[type(child)]
                child.__class__ = plain
    assert mx.array_equal(logits, model(ids)).item()
