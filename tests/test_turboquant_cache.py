"""Quantized KV caches in the model: every layer (sliding rings, global layers, KV-shared readers),
decode equal to prefill, trim/rollback, prompt-cache state, memory, and the KVQuantConfig checks."""

import argparse

import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma4.model.text as text
from mlx_gemma4 import load
from mlx_gemma4.cache import FullCache, SlidingCache
from mlx_gemma4.presets import preset_config
from mlx_gemma4.prompt_cache import PromptCache
from mlx_gemma4.quantized_cache import KVQuantConfig, QuantizedSlidingCache, make_quantized_cache

TQ = KVQuantConfig("turboquant", bits=4, bits_v=3)
TQ_RECENT = KVQuantConfig("turboquant", bits=4, bits_v=3, recent=16)  # the bundled window is 64


@pytest.fixture(scope="module")
def model():
    model, _ = load()
    model.set_dtype(mx.float32)
    return model


def tokens(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(3, 4000, (1, n)), mx.int32)


def run_one_by_one(model, ids, cache):
    return mx.concatenate([model(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])], axis=1)


@pytest.mark.parametrize("kv_quant", [TQ, TQ_RECENT, KVQuantConfig("affine", bits=8)], ids=str)
def test_every_layer_is_quantized_and_decode_matches_prefill(model, kv_quant):
    ids = tokens(110)
    cache = model.make_cache(kv_quant=kv_quant)
    assert all(type(c).__name__.startswith("Quantized") for c in cache)
    assert any(isinstance(c, QuantizedSlidingCache) for c in cache)
    prefill = model(ids, cache=model.make_cache(kv_quant=kv_quant))
    model(ids[:, :90], cache=cache)
    decode = run_one_by_one(model, ids[:, 90:], cache)  # the rings (95 slots) wrap
    assert cache[0].offset > cache[0].capacity
    assert mx.abs(prefill[:, 90:] - decode).max().item() < 2e-3


def test_quantized_logits_stay_close_to_the_plain_cache(model):
    ids = tokens(150, seed=1)
    plain = mx.softmax(model(ids), axis=-1)
    for kv_quant, budget in ((KVQuantConfig("turboquant", 4), 0.05), (KVQuantConfig("affine", 8), 0.01)):
        quantized = mx.softmax(model(ids, cache=model.make_cache(kv_quant=kv_quant)), axis=-1)
        kl = mx.sum(plain * (mx.log(plain) - mx.log(quantized)), axis=-1).mean().item()
        assert 0 < kl < budget, (kv_quant, kl)


def test_a_recent_window_longer_than_the_context_is_the_plain_cache(model):
    """Every query reads every key from the full-precision window: the codes are never read."""
    ids = tokens(100, seed=6)
    cache = model.make_cache(kv_quant=KVQuantConfig("turboquant", 2, recent=128))
    got = mx.concatenate([model(ids[:, :70], cache=cache), run_one_by_one(model, ids[:, 70:], cache)], axis=1)
    assert mx.abs(got - model(ids)).max().item() < 1e-4


def test_recent_window_brings_tq_closer_to_the_plain_cache(model):
    ids = tokens(150, seed=1)
    plain = mx.softmax(model(ids), axis=-1)
    kls = []
    for kv_quant in (KVQuantConfig("turboquant", 3), KVQuantConfig("turboquant", 3, recent=16)):
        quantized = mx.softmax(model(ids, cache=model.make_cache(kv_quant=kv_quant)), axis=-1)
        kls.append(mx.sum(plain * (mx.log(plain) - mx.log(quantized)), axis=-1).mean().item())
    assert 0 < kls[1] < kls[0] / 2, kls


def test_recent_window_masks_are_shared_only_by_caches_in_the_same_state():
    """The masks are made once a step for all layers alike; a cache in another state gets its own."""
    spec = preset_config("E2B").layers[4]  # a global layer
    make = lambda recent, rollback: make_quantized_cache(  # noqa: E731
        KVQuantConfig("turboquant", recent=recent), spec, 512, rollback=rollback)
    a, b, c = make(16, 32), make(16, 32), make(32, 16)  # c's recent ring has a's capacity (47), not its window
    kv = mx.zeros((1, spec.num_kv_heads, 40, spec.head_dim))
    for cache in (a, b, c):
        cache.update_and_fetch(kv, kv)
    assert a._window_masks(1)[0] is b._window_masks(1)[0]
    hidden = lambda cache: int(mx.sum(~cache._window_masks(1)[0]).item())  # noqa: E731
    assert (hidden(a), hidden(c)) == (16, 32)  # packed copies of the new key and the 15 or 31 before it
    b.update_and_fetch(kv[:, :, :1], kv[:, :, :1])
    assert hidden(b) == 16 and b._window_masks(1)[0].shape[-1] == 42


def test_kv_shared_layers_attend_to_the_producers_packed_rows(model, monkeypatch):
    calls = []
    original = text.quantized_attention
    monkeypatch.setattr(text, "quantized_attention", lambda *a, **k: calls.append(a[1].codec) or original(*a, **k))
    cache = model.make_cache(kv_quant=TQ)
    model(tokens(5), cache=cache)
    config = model.config
    assert len(calls) == config.num_hidden_layers > len(cache)  # shared layers too
    for spec in config.layers[config.first_kv_shared_layer :]:
        assert calls[spec.index] is cache[spec.kv_source].key_codec


@pytest.mark.parametrize("kv_quant", [TQ, TQ_RECENT], ids=str)
def test_trim_after_the_ring_wrapped_equals_a_fresh_run(model, kv_quant):
    window = model.config.sliding_window
    ids, other = tokens(window + 50, seed=2), tokens(4, seed=3)
    cache = model.make_cache(kv_quant=kv_quant)
    model(ids, cache=cache)
    assert all(c.can_trim(6) for c in cache)
    for c in cache:
        c.trim(6)
    got = run_one_by_one(model, other, cache)
    fresh = model.make_cache(kv_quant=kv_quant)
    model(ids[:, :-6], cache=fresh)
    want = run_one_by_one(model, other, fresh)
    assert mx.abs(got - want).max().item() < 2e-3


@pytest.mark.parametrize("kv_quant", [TQ, TQ_RECENT], ids=str)
def test_prompt_cache_saves_and_restores_quantized_state(model, tmp_path, kv_quant):
    saved = PromptCache(model, kv_quant)
    ids = tokens(100, seed=4)
    model(ids, cache=saved.cache)
    saved.tokens = ids[0].tolist()
    saved.save(tmp_path / "c.safetensors")
    restored = PromptCache.load(tmp_path / "c.safetensors", model, kv_quant)
    step = tokens(1, seed=5)
    want = model(step, cache=saved.cache)
    got = model(step, cache=restored.cache)
    assert mx.array_equal(got, want).item()
    with pytest.raises(ValueError, match="KV cache"):
        PromptCache.load(tmp_path / "c.safetensors", model, KVQuantConfig("turboquant", 3))


@pytest.mark.parametrize("preset", ["E2B", "31B"])
def test_cache_bytes_shrink_over_3_5x_at_4_bits(preset):
    """Real head dims (256 sliding, 512 global): the arrays a sliding and a global cache hold, against bf16."""
    config = preset_config(preset)
    kv_quant = KVQuantConfig("turboquant", 4)
    plain_bytes = quantized_bytes = 0
    one_of_each = {spec.layer_type: spec for spec in config.layers[: config.first_kv_shared_layer]}
    for spec in one_of_each.values():
        plain = SlidingCache(config.sliding_window) if spec.is_sliding else FullCache()
        quantized = make_quantized_cache(kv_quant, spec, config.sliding_window)
        x = mx.random.normal((1, spec.num_kv_heads, 40, spec.head_dim)).astype(mx.bfloat16)
        for cache in (plain, quantized):
            mx.eval(cache.update_and_fetch(x, x))
        plain_bytes += plain.nbytes
        quantized_bytes += quantized.nbytes
    assert plain_bytes / quantized_bytes >= 3.5


@pytest.mark.parametrize("recent", [0, 16])
def test_a_tq_decode_step_launches_what_bf16_does_plus_the_encodes(recent):
    """On the GPU code path (kernels stood in by one op each) TurboQuant adds no MLX op to a decode step
    but one encode kernel per key and per value of each KV-owning layer; a recent window is attended
    inside the kernels and adds only its ring's writes of the new key and value."""
    from benchmarks.kv_quant_step_ops import gpu_path, shrunk_model, step_cost

    with gpu_path():
        model = shrunk_model("E2B")
        bf16 = step_cost(model, None, 600, repeats=1)
        tq = step_cost(model, KVQuantConfig("turboquant", 4, recent=recent), 600, repeats=1)
    owners = model.config.first_kv_shared_layer
    assert tq["kernels"] == bf16["kernels"] + 2 * owners
    assert tq["mlx"] - bf16["mlx"] == (2 * owners if recent else 0)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown KV quantization"):
        KVQuantConfig("fp8")
    with pytest.raises(ValueError, match="bits_v=5"):
        KVQuantConfig("turboquant", 4, bits_v=5)
    with pytest.raises(ValueError, match="choose one of 4, 8"):
        KVQuantConfig("affine", 3)
    with pytest.raises(ValueError, match="recent=16"):
        KVQuantConfig("affine", 8, recent=16)
    with pytest.raises(ValueError, match="recent=-1"):
        KVQuantConfig("turboquant", 4, recent=-1)
    assert str(KVQuantConfig("turboquant", 4, 3)) == "turboquant 4/3"
    assert str(TQ_RECENT) == "turboquant 4/3 + recent 16"


def test_cli_refuses_bad_kv_bits_in_one_line(capsys):
    from mlx_gemma4.cli import generate_main

    with pytest.raises(SystemExit) as exit_:
        generate_main(["--kv-quant", "affine", "--kv-bits", "3", "-p", "hi"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err.strip() == "mlx_gemma4.generate: error: affine KV bits=3: choose one of 4, 8"


def test_cli_kv_recent_reaches_the_cache(capsys):
    from mlx_gemma4.cli import generate_main, kv_quant_from

    with pytest.raises(SystemExit) as exit_:
        generate_main(["--kv-quant", "affine", "--kv-recent", "16", "-p", "hi"])
    assert exit_.value.code == 1
    assert "recent=16" in capsys.readouterr().err
    args = argparse.Namespace(kv_quant="turboquant", kv_bits=4, kv_bits_v=3, kv_recent=16)
    assert kv_quant_from(args) == TQ_RECENT
