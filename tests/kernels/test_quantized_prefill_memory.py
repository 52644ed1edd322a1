"""Prefill on the dequantize path keeps one layer's dequantized weight at a time: peak memory does not
grow with the layer count. The dequantized weight depends on no activation, so without an explicit
dependency MLX may schedule every layer's dequantize before the first matmul (a stack of 16 such layers
peaked at ~13 dequantized weights on the CPU).

On a GPU the order alone does not bound the peak: within one evaluation MLX frees a buffer only once the
command buffer that used it completed (on an H100, 16 such layers peaked at 54.5 MB against 4 layers'
13.6). There the model paces its prefill one layer ahead, which the GPU test below measures."""

import mlx.core as mx
import pytest

from mlx_gemma4.kernels import backend
from mlx_gemma4.kernels import quantized_matmul as qmm

D = 512  # one dequantized weight: 1 MB in float32


def peak_bytes(layers: int, rows: int = 128) -> int:
    """Peak memory above the inputs of `layers` quantized layers (tanh between them) on 128 rows."""
    weights = [mx.quantize(mx.random.normal((D, D), key=mx.random.key(i)) * 0.03, 64, 4) for i in range(layers)]
    x = mx.random.normal((rows, D), key=mx.random.key(layers))
    mx.eval(weights, x)
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    h = x
    for w in weights:
        h = mx.tanh(qmm.dequantized_matmul(h, *w, 64, 4))
    mx.eval(h)
    return mx.get_peak_memory() - base


def check_flat():
    dense = D * D * 4
    few, many = peak_bytes(4), peak_bytes(16)
    assert many <= few + dense / 2, f"4 layers: {few / 1e6:.1f} MB, 16 layers: {many / 1e6:.1f} MB"


def test_peak_does_not_grow_with_layers():
    with mx.stream(mx.cpu):
        check_flat()


@pytest.mark.gpu
@pytest.mark.skipif(backend() == "reference", reason="no GPU backend")
def test_model_prefill_holds_few_layers_of_dequantized_weights(monkeypatch):
    """Across layers the GPU lags the host: MLX frees a layer's dequantized weights only once the GPU ran
    it, and queues up to 10 command buffers ahead. The model's prefill on our layers runs one layer ahead
    at most (model/text.py _one_layer_ahead): its peak stays within ~3 layers' dense weights."""
    import math

    from benchmarks.pair import reduced_preset
    from mlx_gemma4.model.quantized_linear import QuantizedLinear
    from mlx_gemma4.presets import random_model

    monkeypatch.setenv(qmm.PATH_ENV, "dequantize")
    layers = 8
    model = random_model(reduced_preset("31B", layers=layers, vocab=1024), bits=4)
    mx.eval(model.parameters())
    dense = sum(2 * m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits for _, m in model.named_modules()
                if isinstance(m, QuantizedLinear)) / layers
    tokens = mx.random.randint(0, 1024, (1, 512))
    peaks = {}
    for paced_from in (1, math.inf):
        model.model.paced_from = paced_from
        cache = model.make_cache()
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(model(tokens, cache=cache))
        peaks[paced_from] = mx.get_peak_memory() - base
    print(f"a layer's dense weights {dense / 1e9:.2f} GB; peak paced {peaks[1] / 1e9:.2f} GB, "
          f"unpaced {peaks[math.inf] / 1e9:.2f} GB")
    assert peaks[1] <= 3 * dense
