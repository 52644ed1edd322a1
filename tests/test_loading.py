"""Loading: shards, every weight-name layout, and one clear error for each kind of bad checkpoint."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4 import LoadError, load_model
from tiny import oracle_logits, save_causal_lm

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def e2b(tmp_path_factory):
    return save_causal_lm("e2b", tmp_path_factory.mktemp("e2b"))


def copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads(tmp_path):
    import transformers

    folder = save_causal_lm("26b", tmp_path / "src")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = np.arange(12)[None] % 96
    expected = oracle_logits(folder, ids)
    out = np.array(load_model(tmp_path / "sharded")(mx.array(ids, dtype=mx.int32)))
    assert np.abs(out - expected).max() <= 1e-4


def test_missing_shard_names_the_file(tmp_path):
    import transformers

    folder = save_causal_lm("31b", tmp_path / "src")
    transformers.AutoModelForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "s", max_shard_size="20KB")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "s" / victim).unlink()
    with pytest.raises(LoadError, match=victim):
        load_model(tmp_path / "s")


def test_shape_mismatch_names_the_tensor(e2b, tmp_path):
    folder = copy(e2b, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"model\.layers\.\d+\.mlp\.\w+_proj\.weight in .*model\.safetensors has shape"):
        load_model(folder)


def test_unknown_model_type(e2b, tmp_path):
    folder = copy(e2b, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gemma3_text"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="gemma3_text.*not a Gemma 4"):
        load_model(folder)


def test_missing_config_and_missing_folder(e2b, tmp_path):
    folder = copy(e2b, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(LoadError, match="config.json"):
        load_model(folder)
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "nowhere" / "model")


def test_corrupt_weights_name_the_file(e2b, tmp_path):
    folder = copy(e2b, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LoadError, match="model.safetensors"):
        load_model(folder)


def test_missing_tensor_is_reported(e2b, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = copy(e2b, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(LoadError, match="lacks 1 tensors"):
        load_model(folder)


def test_shared_layer_kv_weights_are_dropped(e2b, tmp_path):
    """Real checkpoints carry k/v projections for KV-shared layers; they must be ignored, not rejected."""
    from safetensors.numpy import load_file, save_file

    folder = copy(e2b, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    shared = 5  # e2b: layers 3.. share KV
    tensors[f"model.layers.{shared}.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
    tensors[f"model.layers.{shared}.self_attn.v_proj.weight"] = np.zeros((32, 64), np.float32)
    tensors[f"model.layers.{shared}.self_attn.k_norm.weight"] = np.zeros((32,), np.float32)
    save_file(tensors, folder / "model.safetensors")
    ids = np.arange(10)[None]
    expected = oracle_logits(e2b, ids)
    out = np.array(load_model(folder)(mx.array(ids, dtype=mx.int32)))
    assert np.abs(out - expected).max() <= 1e-4
