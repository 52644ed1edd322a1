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


@pytest.mark.parametrize(
    "on,rows,expected",
    [("cuda", 1, "gemv"), ("cuda", 8, "gemv"), ("cuda", 9, "mlx"), ("cuda", 31, "mlx"), ("cuda", 32, "dequantize"),
     ("cuda", 4096, "dequantize"), ("metal", 1, "mlx"), ("metal", 2048, "mlx"), ("reference", 1, "mlx")],
)
def test_table(monkeypatch, on, rows, expected):
    monkeypatch.setenv(ENV, on)
    monkeypatch.delenv(qmm.PATH_ENV, raising=False)
    assert qmm.path(*case(rows)) == expected


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
    monkeypatch.delenv(qmm.PATH_ENV, raising=False)
    monkeypatch.setattr(kernel, "_verdicts", {})
    inputs = case(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [qmm.quantized_matmul(*inputs) for _ in range(2)]
    assert [w.category for w in caught] == [KernelFallbackWarning]
    assert all(mx.array_equal(out, qmm.mlx_matmul(*inputs)).item() for out in outputs)


def test_random_model_uses_our_layers():
    model = random_model(reduced_preset("E2B", layers=2, vocab=512), bits=4, dtype=mx.float32)
    layers = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert layers and all(type(m) in (QuantizedLinear, QuantizedEmbedding) for m in layers)


def test_checkpoint_loads_into_our_layers_with_unchanged_names(tmp_path, monkeypatch):
    """A 4-bit conversion loads into our layers, and computes what nn.QuantizedLinear computes
    (on the CPU every path is MLX's op)."""
    monkeypatch.delenv(qmm.PATH_ENV, raising=False)
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
