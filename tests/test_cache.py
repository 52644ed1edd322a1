"""Caches: rollback after the sliding window has wrapped, state round trips, bounded memory."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import load_model
from mlx_gemma4.cache import SlidingCache
from tiny import WINDOW, oracle_logits, save_causal_lm

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def e2b(tmp_path_factory):
    return save_causal_lm("e2b", tmp_path_factory.mktemp("e2b"))


def step(model, ids, cache):
    return np.array(model(mx.array(ids, dtype=mx.int32), cache=cache))


def test_rollback_16_after_wrap_matches_fresh_run(e2b):
    """Speculative decoding: decode 20 tokens past the wrap, reject 16, continue on other tokens."""
    rng = np.random.default_rng(5)
    prompt, accepted_then_rejected, replacement = (rng.integers(0, 96, (1, n)) for n in (3 * WINDOW, 20, 16))
    model = load_model(e2b)
    cache = model.make_cache(rollback=16)
    step(model, prompt, cache)
    for i in range(20):
        step(model, accepted_then_rejected[:, i : i + 1], cache)
    assert all(c.can_trim(16) for c in cache)
    assert all(c.trim(16) == 16 for c in cache)
    out = np.concatenate([step(model, replacement[:, i : i + 1], cache) for i in range(16)], axis=1)
    full = np.concatenate([prompt, accepted_then_rejected[:, :4], replacement], axis=1)
    assert np.abs(out - oracle_logits(e2b, full)[:, -16:]).max() <= 1e-4


def test_rollback_beyond_slack_is_refused():
    cache = SlidingCache(window=WINDOW, rollback=16)
    kv = mx.zeros((1, 1, 40, 4))
    cache.update_and_fetch(kv, kv)
    assert cache.can_trim(16) and not cache.can_trim(17)
    with pytest.raises(ValueError, match="roll back 17"):
        cache.trim(17)
    assert cache.offset == 40  # a refused trim changes nothing


def test_sliding_cache_memory_is_bounded():
    cache = SlidingCache(window=WINDOW, rollback=16)
    one = mx.zeros((1, 2, 1, 4))
    for _ in range(100):
        cache.update_and_fetch(one, one)
    cache.update_and_fetch(mx.zeros((1, 2, 50, 4)), mx.zeros((1, 2, 50, 4)))
    assert cache.keys.shape[2] == WINDOW - 1 + 16
    assert cache.offset == 150


def test_state_round_trip(e2b):
    rng = np.random.default_rng(6)
    prompt, follow = rng.integers(0, 96, (1, 2 * WINDOW + 3)), rng.integers(0, 96, (1, 1))
    model = load_model(e2b)
    cache = model.make_cache()
    step(model, prompt, cache)
    restored = model.make_cache()
    for source, target in zip(cache, restored):
        target.state = source.state
    assert np.abs(step(model, follow, cache) - step(model, follow, restored)).max() == 0


def test_kv_shared_layers_own_no_cache(e2b):
    model = load_model(e2b)
    cache = model.make_cache()
    assert len(cache) == model.config.first_kv_shared_layer == 3
    assert [type(c).__name__ for c in cache] == ["SlidingCache", "SlidingCache", "FullCache"]
