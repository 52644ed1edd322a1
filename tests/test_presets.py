"""Real-size presets build with random weights and run."""

import mlx.core as mx
import pytest

from mlx_gemma4.presets import random_model


@pytest.mark.slow
def test_e2b_4bit_builds_and_runs_on_cpu():
    model = random_model("E2B", bits=4, dtype=mx.float32)
    assert model.model.embed_tokens_per_layer.weight.dtype == mx.uint32  # the PLE table is 4-bit, not bf16
    cache = model.make_cache()
    assert len(cache) == 15  # 20 of 35 layers share KV and own no cache
    logits = model(mx.array([[2, 818, 5279, 529]], dtype=mx.int32), cache=cache)
    step = model(mx.array([[9]], dtype=mx.int32), cache=cache)
    assert logits.shape == (1, 4, 262_144) and step.shape == (1, 1, 262_144)
    assert mx.all(mx.isfinite(logits)).item() and mx.abs(logits).max().item() <= 30.0
    assert cache[0].offset == 5
