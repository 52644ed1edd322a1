"""Checkpoints written by mlx-lm's converter (plain and quantized) load and give mlx-lm's own logits."""

import json

import mlx.core as mx
import numpy as np
import pytest

from benchmarks.compat import older_spelling_copy
from mlx_gemma4 import load_model
from tiny import VARIANTS, oracle_logits, save_causal_lm, save_tokenizer

pytest.importorskip("torch")
mlx_lm = pytest.importorskip("mlx_lm")


@pytest.mark.parametrize("variant", ["e2b", "26b"])
@pytest.mark.parametrize("quantize", [False, True])
def test_mlx_lm_conversion_loads(tmp_path, variant, quantize):
    source = save_tokenizer(save_causal_lm(variant, tmp_path / "hf"))
    older = older_spelling_copy(source, tmp_path / "older")
    converted = tmp_path / "mlx"
    mlx_lm.convert(str(older), mlx_path=str(converted), quantize=quantize, q_bits=4, q_group_size=32, dtype="float32")
    if quantize:
        assert json.loads((converted / "config.json").read_text())["quantization"]["bits"] == 4
    ids = np.random.default_rng(4).integers(0, VARIANTS[variant]["vocab_size"], (1, 30))
    theirs, _ = mlx_lm.load(str(converted))
    ours = load_model(converted)
    x = mx.array(ids, dtype=mx.int32)
    assert np.abs(np.array(ours(x)) - np.array(theirs(x))).max() <= 1e-5
    if not quantize:
        assert np.abs(np.array(ours(x)) - oracle_logits(source, ids)).max() <= 1e-4


def test_mlx_vlm_conversion_loads():
    """A 4-bit conversion written by mlx-vlm 0.7.10 (see fixtures/make_mlx_vlm_fixture.py) gives its logits."""
    from pathlib import Path

    folder = Path(__file__).parent / "fixtures" / "mlx_vlm_26b_q4"
    ids = np.load(folder / "ids.npy")
    out = np.array(load_model(folder)(mx.array(ids, dtype=mx.int32)))
    assert np.abs(out - np.load(folder / "mlx_vlm_logits.npy")).max() <= 1e-5


def test_hub_id_without_network_is_one_clear_error(monkeypatch):
    from mlx_gemma4 import LoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError, match="could not download 'google/gemma-4-nonexistent'"):
        load_model("google/gemma-4-nonexistent")
