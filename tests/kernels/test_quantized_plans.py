"""Our quantized layers' plans: one per input signature, built once, the environment read at swap time.

The GEMV plans run on the CPU emulator: the kernel object a plan holds is swapped for a launcher that
emulates the Metal body, so a layer call goes through exactly the plan a GPU would use."""

import math

import mlx.core as mx
import mlx.nn as nn
import pytest

import metal_check
import metal_emu
from mlx_gemma4.kernels import ENV
from mlx_gemma4.kernels import quantized_matmul as qmm
from benchmarks.pair import reduced_preset
from mlx_gemma4.model import text
from mlx_gemma4.model.layers import MLP
from mlx_gemma4.model.quantized_linear import GegluMLP, QuantizedLinear, kernel_layers_wanted, use_kernel_layers
from mlx_gemma4.presets import random_model

K, N = 256, 12


def our_layer(seed: int = 0) -> QuantizedLinear:
    holder = nn.Sequential(nn.Linear(K, N, bias=False))
    holder.layers[0].weight = mx.random.normal((N, K), key=mx.random.key(seed)).astype(mx.bfloat16)
    nn.quantize(holder, 64, 4)
    return use_kernel_layers(holder).layers[0]


def want(layer, x):
    return qmm.reference(x, layer.weight, layer.scales, layer.biases, 64, 4)


@pytest.fixture
def emulated_gemv(monkeypatch):
    """The CUDA GEMVs forced, their probes passed and their kernel objects the emulator of the Metal body."""
    if not (metal_check.CLANG and metal_emu.CXX):
        pytest.skip("needs clang-19 and clang++-19")
    monkeypatch.setenv(ENV, "cuda")
    monkeypatch.setenv(qmm.PATH_ENV, "gemv")
    monkeypatch.setattr(qmm, "usable", lambda key, probe: True)

    class Emulated(type(qmm.gemv_kernel)):
        def build(self, backend):
            return super().build("metal") if backend == "metal" else lambda **call: metal_emu.run(self, **call)

    for name in ("gemv_kernel", "geglu_kernel"):
        real = getattr(qmm, name)
        monkeypatch.setattr(qmm, name, Emulated(real.name, real.source, real.inputs, real.outputs))


def test_one_plan_per_signature(emulated_gemv):
    """Rows and dtype pick the plan: 1 and 3 rows take the GEMV (each its own template), 9 rows
    MLX's op, float32 its own GEMV; a repeated signature reuses its plan."""
    layer = our_layer()
    inputs = [mx.random.normal(shape, key=mx.random.key(i)).astype(dtype) for i, (shape, dtype) in enumerate([
        ((1, 1, K), mx.bfloat16), ((1, 3, K), mx.bfloat16), ((1, 9, K), mx.bfloat16), ((1, 1, K), mx.float32)])]
    for x in inputs:
        y = layer(x)
        assert y.shape == (*x.shape[:-1], N) and y.dtype == x.dtype
        assert qmm.error(y, want(layer, x)) <= qmm.TOLERANCE[x.dtype] * (40 if x.shape[1] == 9 else 1)
    plans = dict(layer.plans)
    assert len(plans) == 4 and len(set(map(id, plans.values()))) == 4
    assert [name for name in ("gemv", "gemv", "mlx", "gemv")] == [
        "mlx" if run.__name__ == "<lambda>" else "gemv" for run in plans.values()]
    layer(inputs[0])
    assert layer.plans == plans


def test_environment_is_read_at_swap_time(monkeypatch):
    """A changed MLX_GEMMA4_QUANTIZED_MATMUL reaches the layer only when it is swapped in again (then its
    plans are dropped); the call path itself never reads it."""
    monkeypatch.setenv(ENV, "reference")
    calls = []
    real = qmm.dequantized_matmul
    monkeypatch.setattr(qmm, "dequantized_matmul", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv(qmm.PATH_ENV, "dequantize")
    layer = our_layer()
    x = mx.random.normal((2, K))
    first = layer(x)
    monkeypatch.setenv(qmm.PATH_ENV, "not a path")  # never read by a call
    assert mx.array_equal(layer(x), first).item() and len(calls) == 2
    monkeypatch.setenv(qmm.PATH_ENV, "mlx")
    use_kernel_layers(nn.Sequential(layer))
    assert not layer.plans
    assert mx.array_equal(layer(x), qmm.mlx_matmul(x, layer.weight, layer.scales, layer.biases, 64, 4)).item()
    assert len(calls) == 2


@pytest.mark.parametrize("on,choice,wanted", [("cuda", None, True), ("cuda", "mlx", False), ("cuda", "gemv", True),
                                               ("metal", None, False), ("metal", "auto", True),
                                               ("reference", None, False), ("reference", "dequantize", True)])
def test_loaders_swap_our_layers_in_where_the_table_routes_to_them(monkeypatch, on, choice, wanted):
    """By default ours only where the backend's dispatch table sends some shape to our paths (CUDA);
    the environment forces either way."""
    monkeypatch.setenv(ENV, on)
    if choice is None:
        monkeypatch.delenv(qmm.PATH_ENV, raising=False)
    else:
        monkeypatch.setenv(qmm.PATH_ENV, choice)
    assert kernel_layers_wanted() is wanted


def test_bad_environment_fails_before_any_change(monkeypatch):
    layer = our_layer()
    layer(mx.zeros((1, K)))
    path, plans = layer.path, dict(layer.plans)
    monkeypatch.setenv(qmm.PATH_ENV, "fast")
    with pytest.raises(ValueError, match="gemv, dequantize, mlx or auto"):
        use_kernel_layers(nn.Sequential(layer))
    assert layer.path == path and layer.plans == plans


def test_plans_are_not_parameters():
    layer = our_layer()
    layer(mx.zeros((1, K)))
    assert set(layer.parameters()) == {"weight", "scales", "biases"}


def test_mlp_fuses_gate_and_up_on_the_gemv(emulated_gemv, monkeypatch):
    """On the GEMV's row counts the MLP makes one fused launch for gate and up (then down's GEMV), past
    them it is the plain MLP on MLX's op; both compute what MLX's own layers compute."""
    hidden, width = 256, 96
    mlp = MLP(hidden, width)
    for name, shape in (("gate_proj", (width, hidden)), ("up_proj", (width, hidden)), ("down_proj", (hidden, width))):
        getattr(mlp, name).weight = mx.random.normal(shape, key=mx.random.key(len(name))).astype(mx.bfloat16)
    nn.quantize(mlp, 32, 4)
    plain = MLP(hidden, width)
    nn.quantize(plain, 32, 4)
    plain.update(mlp.parameters())
    launched = []
    real = metal_emu.run
    monkeypatch.setattr(metal_emu, "run", lambda kernel, **call: launched.append(kernel.name) or real(kernel, **call))
    use_kernel_layers(mlp)
    assert type(mlp) is GegluMLP and set(mlp.parameters()) == set(plain.parameters())
    for rows, launches in ((2, ["quantized_gemv_geglu", "quantized_gemv"]), (9, [])):
        launched.clear()
        x = mx.random.normal((1, rows, hidden), key=mx.random.key(rows)).astype(mx.bfloat16)
        got = mlp(x)
        assert launched == launches
        if launches:  # against float32 (MLX's CPU op in bfloat16 is itself ~10 % off)
            assert qmm.error(got, plain(x.astype(mx.float32))) <= 4 * qmm.TOLERANCE[mx.bfloat16]
        else:
            assert mx.array_equal(got, plain(x)).item()


def test_mlps_of_a_model_become_fused(monkeypatch):
    monkeypatch.setenv(qmm.PATH_ENV, "auto")
    model = random_model(reduced_preset("E2B", layers=2, vocab=512), bits=4, dtype=mx.float32)
    mlps = [m for _, m in model.named_modules() if isinstance(m, MLP)]
    assert mlps and all(type(m) is GegluMLP for m in mlps)


def test_paced_from_follows_the_tables_dequantize_rules():
    assert qmm.dequantizes_from("auto", "cuda") == min(r[0] for r in qmm.DISPATCH["cuda"] if r[3] == "dequantize")
    assert qmm.dequantizes_from("auto", "metal") == qmm.dequantizes_from("gemv", "cuda") == math.inf
    assert qmm.dequantizes_from("dequantize", "reference") == 1


def test_prefill_on_dequantized_weights_runs_one_layer_ahead(monkeypatch):
    """With our layers dequantizing, inputs from that many rows wait for each layer's predecessor
    (model/text.py _one_layer_ahead), with the same logits; MLX's layers are never paced."""
    monkeypatch.setenv(qmm.PATH_ENV, "mlx")
    assert random_model(reduced_preset("E2B", layers=2, vocab=512), bits=4).model.paced_from == math.inf
    monkeypatch.setenv(qmm.PATH_ENV, "dequantize")
    model = random_model(reduced_preset("E2B", layers=3, vocab=512), bits=4, dtype=mx.float32)
    assert model.model.paced_from == 1
    waits = []
    real = text._one_layer_ahead
    monkeypatch.setattr(text, "_one_layer_ahead", lambda h, previous: waits.append(previous is None) or real(h, previous))
    tokens = mx.array([[5, 9, 2, 7, 3, 8]])
    paced = model(tokens, cache=model.make_cache())
    assert waits == [True, False, False]  # every layer, each after the first waiting for the one before
    model.model.paced_from = math.inf
    assert mx.array_equal(paced, model(tokens, cache=model.make_cache())).item()
    assert len(waits) == 3
