"""Logits parity with transformers' Gemma 4 on random tiny checkpoints of each variant style."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import load_model
from tiny import VARIANTS, WINDOW, oracle_logits, save_causal_lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
LONG = 3 * WINDOW + 7  # prompts well past the sliding window


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    folder = save_causal_lm(request.param, tmp_path_factory.mktemp(request.param))
    ids = np.random.default_rng(1).integers(0, VARIANTS[request.param]["vocab_size"], (1, LONG))
    return folder, ids, oracle_logits(folder, ids)


def run(model, ids, cache=None, **kwargs):
    return np.array(model(mx.array(ids, dtype=mx.int32), cache=cache, **kwargs))


def test_full_sequence(checkpoint):
    folder, ids, expected = checkpoint
    assert np.abs(run(load_model(folder), ids) - expected).max() <= TOL


def test_token_by_token_decode(checkpoint):
    folder, ids, expected = checkpoint
    model = load_model(folder)
    cache = model.make_cache()
    steps = [run(model, ids[:, i : i + 1], cache) for i in range(ids.shape[1])]
    assert np.abs(np.concatenate(steps, axis=1) - expected).max() <= TOL


@pytest.mark.parametrize("chunk", [3, WINDOW, WINDOW + 5])
def test_chunked_prefill_then_decode(checkpoint, chunk):
    folder, ids, expected = checkpoint
    model = load_model(folder)
    cache = model.make_cache()
    prefill = LONG - 4
    pieces = [run(model, ids[:, s : min(s + chunk, prefill)], cache) for s in range(0, prefill, chunk)]
    pieces += [run(model, ids[:, i : i + 1], cache) for i in range(prefill, LONG)]
    assert np.abs(np.concatenate(pieces, axis=1) - expected).max() <= TOL


def test_logits_only_where_needed(checkpoint):
    folder, ids, expected = checkpoint
    model = load_model(folder)
    last = run(model, ids, logits_to_keep=3)
    assert last.shape[1] == 3
    assert np.abs(last - expected[:, -3:]).max() <= TOL


def test_left_padded_batch(checkpoint):
    folder, ids, _ = checkpoint
    short = ids[:, : LONG - 9]
    pad = LONG - short.shape[1]
    batch = np.concatenate([np.concatenate([np.zeros((1, pad), ids.dtype), short], axis=1), ids], axis=0)
    expected_short = oracle_logits(folder, short)
    expected_long = oracle_logits(folder, ids)
    model = load_model(folder)
    # Prefill most of it, then decode the rest token by token, as a batched generator would.
    cache = model.make_cache(left_padding=[pad, 0])
    split = LONG - 5
    out = np.concatenate(
        [run(model, batch[:, :split], cache)] + [run(model, batch[:, i : i + 1], cache) for i in range(split, LONG)],
        axis=1,
    )
    assert np.abs(out[0, pad:] - expected_short[0]).max() <= TOL
    assert np.abs(out[1] - expected_long[0]).max() <= TOL


def test_checkpoint_config_is_per_layer_spelling(checkpoint):
    folder, _, _ = checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert "per_layer_config" in config and "global_head_dim" not in config


def test_older_global_head_dim_spelling(tmp_path):
    """Checkpoints written before transformers 5.2x spell global layers as global_head_dim / num_global_kv."""
    folder = save_causal_lm("26b", tmp_path / "new")
    ids = np.random.default_rng(2).integers(0, 96, (1, 20))
    expected = oracle_logits(folder, ids)
    config = json.loads((folder / "config.json").read_text())
    config.pop("per_layer_config")
    config.update(global_head_dim=VARIANTS["26b"]["global_head_dim"], num_global_key_value_heads=1)
    (folder / "config.json").write_text(json.dumps(config))
    assert np.abs(oracle_logits(folder, ids) - expected).max() == 0  # the oracle reads it the same way
    assert np.abs(run(load_model(folder), ids) - expected).max() <= TOL


def test_conditional_generation_checkpoint(tmp_path):
    """A Gemma4ForConditionalGeneration checkpoint (nested text_config, model.language_model.*)."""
    text = transformers.Gemma4TextConfig(**VARIANTS["e2b"])
    vision = transformers.Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16,
    )
    config = transformers.Gemma4Config(text_config=text.to_dict(), vision_config=vision.to_dict(), audio_config=None)
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    from tiny import randomize_

    randomize_(model, 3)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gemma4" and "text_config" in saved
    ids = np.random.default_rng(3).integers(0, 96, (1, LONG))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits.float().numpy()
    assert np.abs(run(load_model(tmp_path), ids) - expected).max() <= TOL
