"""mlx_gemma4.convert: round trips on every variant style, mlx-lm interop, multimodal towers, and failures
that leave nothing behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_gemma4 import load_model
from mlx_gemma4.convert import ConvertError, convert
from mlx_gemma4.convert import writer
from mlx_gemma4.convert.report import quality
from tiny import VARIANTS, oracle_logits, randomize_, read_json, save_causal_lm, save_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
mlx_lm = pytest.importorskip("mlx_lm")

TOL = 1e-4
IDS = np.random.default_rng(1).integers(0, 96, (1, 28))  # past the sliding window (8) several times

# name -> convert() arguments. Tiny matrices have 48- or 24-wide inputs too: those stay unquantized.
FORMATS = {
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "8-bit": dict(quantize=True, q_bits=8, q_group_size=32, dtype="float32"),
    "4-bit": dict(quantize=True, q_bits=4, q_group_size=32, dtype="float32"),
    "mixed_4_6": dict(quant_recipe="mixed_4_6", q_group_size=32, dtype="float32"),
    "mxfp4": dict(quantize=True, q_mode="mxfp4", dtype="float32"),
}
# Bounds on each stored tensor's error relative to its RMS (about a rounding step of the format over sqrt(12)).
WEIGHT_ERROR_BOUND = {"bfloat16": 0.005, "8-bit": 0.008, "4-bit": 0.12, "mixed_4_6": 0.12, "mxfp4": 0.17}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """variant -> (folder, transformers model, oracle logits on IDS)."""
    out = {}
    for variant in sorted(VARIANTS):
        folder = save_tokenizer(save_causal_lm(variant, tmp_path_factory.mktemp(variant)))
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            out[variant] = (folder, model, model(torch.tensor(IDS)).logits.numpy())
    return out


def logits(model, ids=IDS) -> np.ndarray:
    return np.array(model(mx.array(ids, dtype=mx.int32)).astype(mx.float32))


def read_tensors(folder: Path) -> dict:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(mx.load(str(file)))
    return tensors


def transformers_state(folder: Path) -> dict:
    """The converted weights dequantized to float32 under transformers' names (experts fused again)."""
    quantization = read_json(folder / "config.json").get("quantization", {})
    tensors = read_tensors(folder)
    state = {}
    for name, value in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith((".scales", ".biases")):
            continue
        if f"{module}.scales" in tensors:
            spec = {**quantization, **quantization.get(module, {})}
            value = mx.dequantize(
                value, tensors[f"{module}.scales"], tensors.get(f"{module}.biases"),
                group_size=spec["group_size"], bits=spec["bits"], mode=spec["mode"],
            )  # fmt: skip
        state[name] = value.astype(mx.float32)
    for name in [n for n in state if n.endswith(".switch_glu.gate_proj.weight")]:
        base = name.removesuffix(".switch_glu.gate_proj.weight")
        up = state.pop(f"{base}.switch_glu.up_proj.weight")
        state[f"{base}.gate_up_proj"] = mx.concatenate([state.pop(name), up], axis=-2)
        state[f"{base}.down_proj"] = state.pop(f"{base}.switch_glu.down_proj.weight")
    return {name: torch.from_numpy(np.array(value)) for name, value in state.items()}


def oracle_on_converted(model, state: dict) -> np.ndarray:
    """transformers' logits with the converted (rounded, dequantized) weights swapped in."""
    original = {k: v.clone() for k, v in model.state_dict().items()}
    _, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    try:
        with torch.no_grad():
            return model(torch.tensor(IDS)).logits.numpy()
    finally:
        model.load_state_dict(original)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip(sources, tmp_path, monkeypatch, variant, fmt):
    """Show 1: save_pretrained -> convert -> load. Float32 matches the oracle; every other format computes
    exactly its own rounded/dequantized weights, and its error vs the original is bounded."""
    folder, hf_model, expected = sources[variant]
    if fmt == "mxfp4":  # MLX dequantizes fp-mode embedding rows to bfloat16 (exactly); keep float32 compute
        lookup = nn.QuantizedEmbedding.__call__
        monkeypatch.setattr(nn.QuantizedEmbedding, "__call__", lambda self, x: lookup(self, x).astype(mx.float32))
    out = convert(folder, tmp_path / "out", **FORMATS[fmt])
    model = load_model(out)
    if fmt == "bfloat16":
        assert model.model.norm.weight.dtype == mx.bfloat16
        model.set_dtype(mx.float32)  # MLX's CPU gather_mm (MoE) runs float32 only
    ours = logits(model)
    if fmt == "float32":
        assert np.abs(ours - expected).max() <= TOL
        return
    state = transformers_state(out)
    assert np.abs(ours - oracle_on_converted(hf_model, state)).max() <= TOL
    original = hf_model.state_dict()
    weight_error = max(relative_error(value, original[name]) for name, value in state.items())
    # Random tiny models amplify weight noise into the logits far more than trained ones: reported only.
    logit_error = relative_error(ours, expected)
    top1 = np.mean(ours.argmax(-1) == expected.argmax(-1))
    print(f"\n{variant} {fmt}: weights {weight_error:.4f}, logits {logit_error:.3f} of RMS, top-1 {top1:.0%}")
    assert weight_error <= WEIGHT_ERROR_BOUND[fmt]


def relative_error(value, reference) -> float:
    value, reference = np.asarray(value, np.float64), np.asarray(reference, np.float64)
    return float(np.sqrt(np.mean((value - reference) ** 2) / np.mean(reference**2)))


def test_quantization_block_and_recipe_rules(sources, tmp_path):
    folder = sources["26b"][0]
    out = convert(folder, tmp_path / "out", quant_recipe="mixed_3_6", q_group_size=32)
    config = read_json(out / "config.json")
    block = config["quantization"]
    assert config["quantization_config"] == block
    assert (block["bits"], block["group_size"], block["mode"]) == (3, 32, "affine")
    assert block["model.layers.1.router.proj"] == {"bits": 8, "group_size": 64, "mode": "affine"}
    assert block["model.layers.1.self_attn.v_proj"]["bits"] == 6
    assert block["model.embed_tokens"]["bits"] == 6  # tied output head
    assert block["model.layers.2.self_attn.q_proj"]["bits"] == 6  # a global layer
    assert block["model.layers.0.experts.switch_glu.gate_proj"]["bits"] == 6  # first layer
    assert "model.layers.1.experts.switch_glu.gate_proj" not in block  # bulk: the default 3 bits
    tensors = read_tensors(out)
    assert "model.layers.1.experts.switch_glu.down_proj.scales" not in tensors  # input 24: not a multiple of 32
    assert "model.layers.1.router.scale" in tensors and "model.layers.1.router.scale.scales" not in tensors


def test_mlx_lm_loads_our_conversion(sources, tmp_path):
    """Show 2: mlx-lm 0.32 reads our names and config spelling (per_layer_config source) and gives our logits."""
    for variant in ("e2b", "26b"):
        for fmt in ("float32", "4-bit"):
            out = convert(sources[variant][0], tmp_path / f"{variant}-{fmt}", **FORMATS[fmt])
            assert "global_head_dim" in read_json(out / "config.json")
            theirs, _ = mlx_lm.load(str(out))
            assert np.abs(logits(theirs) - logits(load_model(out))).max() <= 1e-5


def test_ours_loads_mlx_lm_conversion_and_4_bit_is_identical(sources, tmp_path):
    """Show 2, the other way: our loader gives mlx-lm's logits on its conversion; our uniform 4-bit
    stores the same tensors as mlx-lm's 4-bit."""
    for variant in ("e4b", "26b"):
        source = tmp_path / f"{variant}-older-spelling"
        shutil.copytree(sources[variant][0], source)
        config = read_json(source / "config.json")  # mlx-lm 0.32 needs the older spelling to read it
        overrides = next(iter(config.pop("per_layer_config").values()))
        config["global_head_dim"] = overrides["head_dim"]
        config["num_global_key_value_heads"] = overrides.get("num_key_value_heads")
        (source / "config.json").write_text(json.dumps(config))
        theirs_path = tmp_path / f"{variant}-mlx-lm"
        mlx_lm.convert(str(source), mlx_path=str(theirs_path), quantize=True, q_bits=4, q_group_size=32,
                       dtype="float32")  # fmt: skip
        ours_path = convert(sources[variant][0], tmp_path / f"{variant}-ours", **FORMATS["4-bit"])
        theirs_model, _ = mlx_lm.load(str(theirs_path))
        assert np.abs(logits(load_model(theirs_path)) - logits(theirs_model)).max() <= 1e-5
        theirs, ours = read_tensors(theirs_path), read_tensors(ours_path)
        assert sorted(theirs) == sorted(ours)
        assert all(mx.array_equal(theirs[k], ours[k]).item() for k in theirs)


def save_multimodal(folder: Path) -> Path:
    """A tiny Gemma4ForConditionalGeneration (E2B-style text, vision and audio towers) with side files."""
    config = transformers.Gemma4Config(
        text_config=VARIANTS["e2b"],
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64),
        audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          subsampling_conv_channels=[8, 4], output_proj_dims=32),
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    randomize_(model, 0)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Gemma4Processor"}))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder


def test_multimodal_keeps_towers_and_side_files(tmp_path):
    source = save_multimodal(tmp_path / "hf")
    out = convert(source, tmp_path / "out", quantize=True, q_bits=8, q_group_size=32, dtype="float32")
    tensors, original = read_tensors(out), read_tensors(source)
    towers = {k.removeprefix("model."): v for k, v in original.items() if not k.startswith("model.language_model.")}
    assert {"vision_tower", "audio_tower", "embed_vision", "embed_audio"} == {k.split(".")[0] for k in towers}
    for name, value in towers.items():  # copied through, unquantized
        assert mx.array_equal(tensors[name], value).item(), name
    assert "language_model.model.layers.0.self_attn.q_proj.scales" in tensors
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert "vision_tower" in (out / "README.md").read_text()
    expected = oracle_logits(source, IDS)
    for model in (load_model(out), mlx_lm.load(str(out))[0]):
        assert np.sqrt(np.mean((logits(model) - expected) ** 2) / np.mean(expected**2)) <= 0.06


def test_multimodal_4_bit_matches_mlx_vlm_conversion(tmp_path):
    """Show 2, mlx-vlm: our 4-bit conversion of the folder behind tests/fixtures/mlx_vlm_26b_q4 (rebuilt as
    fixtures/make_mlx_vlm_fixture.py builds it) stores exactly the tensors mlx-vlm 0.7.10 wrote, and gives its
    logits. mlx-vlm itself is not installed here."""
    fixture = Path(__file__).parent / "fixtures" / "mlx_vlm_26b_q4"
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, position_embedding_size=64)  # fmt: skip
    config = transformers.Gemma4Config(text_config=VARIANTS["26b"], vision_config=vision, audio_config=None)
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    randomize_(model, 3)
    model.save_pretrained(tmp_path / "hf")
    out = convert(tmp_path / "hf", tmp_path / "out", quantize=True, q_bits=4, q_group_size=32)
    theirs, ours = read_tensors(fixture), read_tensors(out)
    assert sorted(theirs) == sorted(ours)
    assert all(theirs[k].dtype == ours[k].dtype and mx.array_equal(theirs[k], ours[k]).item() for k in theirs)
    ids = np.load(fixture / "ids.npy")
    assert np.abs(logits(load_model(out), ids) - np.load(fixture / "mlx_vlm_logits.npy")).max() <= 1e-5


def test_shards_index_and_card(sources, tmp_path):
    out = convert(sources["31b"][0], tmp_path / "out", dtype="float32", max_shard_bytes=40_000)
    index = read_json(out / "model.safetensors.index.json")
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in read_tensors(out).values())
    assert np.abs(logits(load_model(out)) - sources["31b"][2]).max() <= TOL
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mlx") and "mlx_gemma4.convert --hf-path" in card
    assert (out / "tokenizer.json").exists() and not list(tmp_path.glob(".*partial"))


def test_quality_report(sources, tmp_path, capsys):
    folder = sources["e4b"][0]
    exact = quality(folder, convert(folder, tmp_path / "f32", dtype="float32"))
    assert exact.kl < 1e-8 and exact.top1 == 1.0 and exact.ppl_source == pytest.approx(exact.ppl_converted)
    convert(folder, tmp_path / "q3", quantize=True, q_bits=3, q_group_size=32, dtype="float32", report=True)
    line = capsys.readouterr().out
    assert "KL" in line and "top-1 agreement" in line


# --- failures: one clear error, nothing left behind -------------------------------------------------


def leftovers(parent: Path, name: str) -> list:
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def corrupt_copy(folder: Path, tmp_path: Path, damage) -> Path:
    copy = tmp_path / "corrupt"
    shutil.copytree(folder, copy)
    damage(copy / "model.safetensors")
    return copy


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-100]), "corrupt.*download it again"),
        (lambda f: f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"), "not a valid safetensors"),
    ],
)
def test_corrupt_safetensors(sources, tmp_path, damage, message):
    source = corrupt_copy(sources["e2b"][0], tmp_path, damage)
    with pytest.raises(ConvertError, match=message):
        convert(source, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_failure_mid_write_removes_everything(sources, tmp_path, monkeypatch):
    calls = []

    def fail_on_second(file, tensors):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk unplugged")
        mx.save_safetensors(str(file), tensors)

    monkeypatch.setattr(writer, "save_shard", fail_on_second)
    with pytest.raises(OSError, match="unplugged"):
        convert(sources["e2b"][0], tmp_path / "out", max_shard_bytes=20_000)
    assert len(calls) == 2 and leftovers(tmp_path, "out") == []


KILLED_MIDWAY = """
import sys, time
from mlx_gemma4.convert import writer
from mlx_gemma4.convert.cli import main
save = writer.save_shard
def save_then_stall(file, tensors):
    save(file, tensors)
    print("shard written", flush=True)
    time.sleep(120)
writer.save_shard = save_then_stall
main(sys.argv[1:])
"""


def test_killed_midway_leaves_no_output_folder(sources, tmp_path):
    out = tmp_path / "out"
    args = ["--hf-path", str(sources["31b"][0]), "--mlx-path", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MIDWAY, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "shard written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert all(name.endswith(".partial") for name in leftovers(tmp_path, "out"))  # only the hidden staging folder


def test_existing_output_needs_force(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists.*--force"):
        convert(sources["31b"][0], out)
    assert (out / "keep.txt").read_text() == "mine"
    convert(sources["31b"][0], out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_bad_sources_and_requests(sources, tmp_path, monkeypatch):
    folder = sources["e4b"][0]
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    config = read_json(foreign / "config.json")
    (foreign / "config.json").write_text(json.dumps({**config, "model_type": "gemma3_text"}))
    quantized = convert(folder, tmp_path / "q", quantize=True, q_group_size=32)
    cases = [
        (dict(hf_path=tmp_path / "nowhere"), "does not exist"),
        (dict(hf_path=foreign), "gemma3_text.*not a Gemma 4"),
        (dict(hf_path=quantized), "already quantized"),
        (dict(hf_path=folder, quantize=True, q_bits=7), "affine quantization takes bits"),
        (dict(hf_path=folder, quantize=True, q_mode="mxfp4", q_bits=8), "mxfp4 always packs 4 bits"),
        (dict(hf_path=folder, quant_recipe="mixed_4_6", q_mode="nvfp4"), "recipe mixed_4_6 is affine"),
        (dict(hf_path=folder, q_bits=4), "only with -q"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConvertError, match=message):
            convert(mlx_path=tmp_path / "out", **kwargs)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: Usage(10**12, 10**12, 10_000))
    with pytest.raises(ConvertError, match="not enough disk space"):
        convert(folder, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_failed_upload_keeps_the_conversion(sources, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(self, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    with pytest.raises(ConvertError, match="was written, but uploading it to me/tiny failed: no network"):
        convert(sources["31b"][0], tmp_path / "out", upload_repo="me/tiny")
    assert (tmp_path / "out" / "config.json").exists()


def test_command_line(sources, tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "mlx_gemma4.convert", "--hf-path", str(tmp_path / "nowhere"), "--mlx-path", "x"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and missing.stderr.startswith("error:")
    ok = subprocess.run(
        ["mlx_gemma4.convert", "--hf-path", str(sources["e2b"][0]), "--mlx-path", str(tmp_path / "out"),
         "-q", "--q-bits", "6", "--q-group-size", "32"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert read_json(tmp_path / "out" / "config.json")["quantization"]["bits"] == 6
