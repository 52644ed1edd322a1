"""model/fused.py: q/k/v (k_eq_v: q/k) and gate/up as one matmul over views of one concatenated array."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_gemma4 import load_model
from mlx_gemma4.config import TextConfig
from mlx_gemma4.model import Model
from mlx_gemma4.model.fused import FusedProjections, Projections, fuse_projections
from mlx_gemma4.presets import PRESETS

SMALL = dict(hidden_size=64, intermediate_size=96, vocab_size=128, vocab_size_per_layer_input=128,
             head_dim=16, global_head_dim=32, num_attention_heads=4, sliding_window=8)
# E2B-like: q/k/v layers and KV-shared ones (q only); 31B-like: q/k/v sliding and k_eq_v (q/k) global layers.
LAYOUTS = {
    "E2B": dict(num_hidden_layers=10, layer_types=PRESETS["E2B"]["layer_types"][:10], num_kv_shared_layers=5,
                hidden_size_per_layer_input=32),
    "31B": dict(num_hidden_layers=6, layer_types=PRESETS["31B"]["layer_types"][:6], num_key_value_heads=2,
                num_global_key_value_heads=1),
}
TOKENS = mx.array([[3, 17, 5, 90, 42, 7, 64, 1, 8, 85, 33, 2]])  # ids < 96, the tiny checkpoints' vocabulary


def tiny_model(layout: str, bits=None, bias=False, seed=0) -> Model:
    mx.random.seed(seed)
    model = Model(TextConfig(**{**PRESETS[layout], **SMALL, **LAYOUTS[layout], "attention_bias": bias}))
    model.update(nn.utils.tree_map(lambda a: 0.1 * mx.random.normal(a.shape), model.parameters()))
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    mx.eval(model.parameters())
    return model


def projections(model) -> list:
    return [p for _, m in model.named_modules() for p in vars(m).values() if isinstance(p, Projections)]


def decode(model) -> mx.array:
    """Logits of a prefill past the sliding window, then two single-token steps."""
    cache = model.make_cache()
    out = [model(TOKENS, cache=cache)]
    for token in (11, 12):
        out.append(model(mx.array([[token]]), cache=cache))
    return mx.concatenate(out, axis=1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("layout", ["E2B", "31B"])
def test_fused_outputs_equal_unfused(layout, bits, bias):
    model = tiny_model(layout, bits, bias)
    before = decode(model)
    fuse_projections(model)
    config = model.config
    for spec, layer in zip(config.layers, model.layers):
        attention = layer.self_attn
        if spec.owns_kv:
            names = ("q_proj", "k_proj") if spec.k_eq_v else ("q_proj", "k_proj", "v_proj")
            assert type(attention.project_qkv) is FusedProjections and attention.project_qkv.names == names
        else:
            assert not hasattr(attention, "project_qkv")  # q only: nothing to fuse
        assert type(layer.mlp.project_gate_up) is FusedProjections
    x = mx.random.normal((2, 3, config.hidden_size))
    for layer in model.layers:
        for parent, fused in ((layer.self_attn, getattr(layer.self_attn, "project_qkv", None)),
                              (layer.mlp, layer.mlp.project_gate_up)):
            for name, out in zip(fused.names, fused(parent, x)) if fused is not None else ():
                np.testing.assert_allclose(np.array(out), np.array(parent[name](x)), rtol=1e-6, atol=1e-6)
    after = decode(model)
    scale = float(mx.abs(before).max())
    assert float(mx.abs(after - before).max()) <= 1e-6 * scale
    assert all(type(p) is FusedProjections for p in projections(model))  # still fused: nothing went stale


def test_mixed_formats_stay_apart():
    """mixed recipes may quantize v_proj differently: that attention stays three matmuls; the MLP fuses."""
    model = tiny_model("31B")
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda path, m: {"group_size": 32, "bits": 8} if path.endswith("v_proj") else
                hasattr(m, "to_quantized"))
    mx.eval(model.parameters())
    before = decode(model)
    fuse_projections(model)
    sliding, full = model.layers[0], model.layers[5]
    assert type(sliding.self_attn.project_qkv) is Projections  # v_proj 8-bit, q/k 4-bit
    assert type(full.self_attn.project_qkv) is FusedProjections  # k_eq_v: q/k only, both 4-bit
    assert type(sliding.mlp.project_gate_up) is FusedProjections
    np.testing.assert_array_equal(np.array(decode(model)), np.array(before))


@pytest.mark.parametrize("bits", [None, 4])
def test_replaced_arrays_are_honoured(bits):
    model, twin = tiny_model("31B", bits), tiny_model("31B", bits)
    fuse_projections(model)
    for seed, path in enumerate(("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"), 1):
        source = tree_flatten(tiny_model("31B", bits, seed=seed).parameters())
        arrays = [(name, value) for name, value in source if name.startswith(path + ".")]
        model.load_weights(arrays, strict=False)
        twin.load_weights(arrays, strict=False)
    np.testing.assert_allclose(np.array(decode(model)), np.array(decode(twin)), rtol=1e-6, atol=1e-6)
    assert type(model.layers[0].self_attn.project_qkv) is Projections  # unfused for good
    assert type(model.layers[1].mlp.project_gate_up) is Projections
    assert type(model.layers[1].self_attn.project_qkv) is FusedProjections  # untouched layers stay fused


def test_swapped_module_and_dtype_change_are_honoured():
    model, twin = tiny_model("E2B"), tiny_model("E2B")
    fuse_projections(model)
    nn.quantize(model, group_size=32, bits=4)  # replaces every projection module after fusing
    nn.quantize(twin, group_size=32, bits=4)
    np.testing.assert_array_equal(np.array(decode(model)), np.array(decode(twin)))
    assert not any(type(p) is FusedProjections for p in projections(model))
    fuse_projections(model)
    model.set_dtype(mx.bfloat16)  # new scales and biases, same packed weights
    twin.set_dtype(mx.bfloat16)
    np.testing.assert_array_equal(np.array(decode(model).astype(mx.float32)), np.array(decode(twin).astype(mx.float32)))


def test_parameters_unchanged_and_memory_not_doubled(tmp_path):
    mx.random.seed(0)
    config = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=2, layer_types=["sliding_attention"] * 2)
    model = Model(TextConfig(**{**PRESETS["31B"], **SMALL, **LAYOUTS["31B"], **config}))
    mx.eval(model.parameters())
    before = [(k, np.array(v)) for k, v in tree_flatten(model.parameters())]  # copies: the arrays must go
    layer_bytes = max(sum(v.nbytes for k, v in before if f".{i}.self_attn." in k or f".{i}.mlp." in k) for i in range(2))
    mx.synchronize()
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    fuse_projections(model)
    assert all(type(p) is FusedProjections for p in projections(model))
    after = tree_flatten(model.parameters())
    assert [k for k, _ in after] == [k for k, _ in before]
    for (_, a), (_, b) in zip(after, before):
        assert np.array(a).dtype == b.dtype and np.array_equal(np.array(a), b)
    # The replaced arrays are freed: the model takes what it took; fusing held at most one layer twice.
    assert mx.get_active_memory() <= active + (64 << 10)
    assert mx.get_peak_memory() <= active + layer_bytes + (64 << 10)
    q = model.layers[0].self_attn.q_proj.weight
    fused = model.layers[0].self_attn.project_qkv.linear.weight
    assert q.shape[0] < fused.shape[0]
    model.save_weights(str(tmp_path / "w.safetensors"))  # views save as their own rows
    saved = mx.load(str(tmp_path / "w.safetensors"))
    for k, v in after:
        np.testing.assert_array_equal(np.array(saved[k]), np.array(v))


def test_load_model_fuses_and_lazy_does_not(tmp_path):
    from tiny import save_causal_lm

    folder = save_causal_lm("31b", tmp_path / "m")
    eager, lazy = load_model(folder), load_model(folder, lazy=True)
    assert projections(eager) and all(type(p) is FusedProjections for p in projections(eager))
    assert projections(lazy) and not any(type(p) is FusedProjections for p in projections(lazy))
    np.testing.assert_allclose(np.array(decode(eager)), np.array(decode(lazy)), rtol=1e-5, atol=1e-5)


def test_app_loader_fuses():
    """mlx_gemma4.api's loader (lazy, then evaluated a tensor at a time for its progress) fuses as load_model does."""
    from mlx_gemma4 import BUNDLED_MODEL
    from mlx_gemma4.api import load_weights

    folder = BUNDLED_MODEL
    model, _ = load_weights(str(folder))
    assert projections(model) and all(type(p) is FusedProjections for p in projections(model))
    assert mx.array_equal(decode(model), decode(load_model(folder, lazy=True))).item()


@pytest.mark.parametrize("layout", ["E2B", "31B"])
def test_kernel_layers_fuse(layout, monkeypatch):
    """Our kernel layers (model/quantized_linear.py) fuse too: one matmul over q/k/v, with plans of its own."""
    from mlx_gemma4.model.quantized_linear import QuantizedLinear, use_kernel_layers

    model, twin = (use_kernel_layers(tiny_model(layout, bits=4)) for _ in range(2))
    before = decode(twin)
    fuse_projections(model)
    fused = projections(model)
    assert fused and all(type(p) is FusedProjections and type(p.linear) is QuantizedLinear for p in fused)
    after = decode(model)
    assert float(mx.abs(after - before).max()) <= 1e-6 * float(mx.abs(before).max())
    qkv = model.layers[0].self_attn.project_qkv
    assert qkv.linear.plans is not qkv.members[0].plans and qkv.linear.plans  # planned for the fused shape
    monkeypatch.setenv("MLX_GEMMA4_QUANTIZED_MATMUL", "dequantize")
    use_kernel_layers(model)  # re-reads the path: the fused layer drops its plans too
    assert not qkv.linear.plans and qkv.linear.path == "dequantize"
    np.testing.assert_allclose(np.array(decode(model)), np.array(after), rtol=1e-2, atol=1e-2)
    assert all(type(p) is FusedProjections for p in projections(model))
