"""Config reading: every spelling, transformers' defaults, and the four real sizes' per-layer layout."""

import pytest

from mlx_gemma4.config import FULL, SLIDING, ConfigError, TextConfig
from mlx_gemma4.presets import PRESETS, preset_config

transformers = pytest.importorskip("transformers")


def test_defaults_equal_transformers():
    ours, theirs = TextConfig(), transformers.Gemma4TextConfig()
    theirs.allow_global_per_layer_attribute_access = True
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "sliding_window", "layer_types", "rope_parameters",
                 "hidden_size_per_layer_input", "vocab_size_per_layer_input", "use_double_wide_mlp",
                 "final_logit_softcapping", "rms_norm_eps", "tie_word_embeddings", "attention_k_eq_v"):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_resolve_like_transformers(name):
    ours = preset_config(name)
    theirs = transformers.Gemma4TextConfig(**PRESETS[name])
    modes = theirs.kv_sharing_modes
    for spec in ours.layers:
        layer = theirs.per_layer_config[spec.index]
        assert (spec.head_dim, spec.num_kv_heads) == (layer.head_dim, layer.num_key_value_heads), spec
        assert spec.owns_kv == (modes[spec.index] != "reuse")
    # and once more through transformers' own serialisation (the per_layer_config spelling)
    assert TextConfig.from_dict(theirs.to_dict()).layers == ours.layers


def test_real_layouts():
    e2b = preset_config("E2B")
    shared = [s for s in e2b.layers if not s.owns_kv]
    assert len(shared) == 20 and {s.kv_source for s in shared} == {13, 14}
    assert {s.intermediate_size for s in shared} == {12288}
    assert all(s.intermediate_size == 6144 for s in e2b.layers[:15])
    globals_26b = [s for s in preset_config("26B-A4B").layers if s.layer_type == FULL]
    assert [s.index for s in globals_26b] == [5, 11, 17, 23, 29]
    assert {(s.head_dim, s.num_kv_heads, s.k_eq_v) for s in globals_26b} == {(512, 2, True)}
    e4b_global = [s for s in preset_config("E4B").layers if s.layer_type == FULL]
    assert {(s.head_dim, s.num_kv_heads, s.k_eq_v) for s in e4b_global} == {(512, 2, False)}
    assert {s.rope_fraction for s in e4b_global} == {0.25}


def test_nested_text_config_and_mlx_lm_pattern_spelling():
    flat = dict(PRESETS["E4B"])
    layer_types = flat.pop("layer_types")
    nested = {"model_type": "gemma4", "text_config": {**flat, "sliding_window_pattern": 6}}
    assert TextConfig.from_dict(nested).layer_types == layer_types
    assert TextConfig.from_dict({**flat, "model_type": "gemma4_text"}).layer_types == layer_types  # default 5:1


def test_per_layer_config_with_string_keys():
    config = TextConfig.from_dict({
        "model_type": "gemma4_text", "num_hidden_layers": 4, "num_key_value_heads": 4, "head_dim": 16,
        "layer_types": [SLIDING, FULL, SLIDING, FULL],
        "per_layer_config": {"1": {"head_dim": 64, "num_key_value_heads": 2}, "3": {"head_dim": 64}},
    })
    assert [(s.head_dim, s.num_kv_heads) for s in config.layers] == [(16, 4), (64, 2), (16, 4), (64, 4)]


@pytest.mark.parametrize("bad, message", [
    ({"model_type": "llama"}, "not a Gemma 4"),
    ({"model_type": "gemma4_text", "num_hidden_layers": 2, "layer_types": [SLIDING]}, "layer_types has 1"),
    ({"model_type": "gemma4_text", "rope_parameters": {SLIDING: {"rope_type": "yarn", "rope_theta": 1.0}}}, "yarn"),
    ({"model_type": "gemma4_text", "enable_moe_block": True}, "num_experts"),
    ({"model_type": "gemma4_text", "hidden_activation": "silu"}, "silu"),
    ({"model_type": "gemma4_text", "per_layer_config": {"5": {"sliding_window": 3}}}, "sliding_window"),
])
def test_bad_configs_raise_one_clear_error(bad, message):
    with pytest.raises(ConfigError, match=message):
        TextConfig.from_dict(bad)
