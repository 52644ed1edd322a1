"""Audio: the tower and `embed_audio` against transformers' Gemma4ForConditionalGeneration on random tiny
configs (weights through save_pretrained), mel features and soft-token counts against transformers'
feature extractor and processor, and clip decoding."""

import dataclasses
import functools
import http.server
import struct
import threading
import types
import wave

import mlx.core as mx
import numpy as np
import pytest

from mlx_gemma4.audio_features import (
    AudioError,
    audio_features,
    feature_extractor,
    load_audio,
    resample,
    soft_token_counts,
)
from mlx_gemma4.config import ConfigError
from mlx_gemma4.model.audio import AudioConfig, AudioEmbedder, AudioEncoder

transformers = pytest.importorskip("transformers")  # torch is imported where the oracle model is built

RATE = 16_000
# Tiny towers: chunks of 4 or 5 steps so that the clips below end inside a chunk; the second has
# right context. The first input projection reads channels[0] mel bins (transformers sizes it so).
TOWERS = {
    "left": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, subsampling_conv_channels=[16, 8],
                 output_proj_dims=24, attention_chunk_size=4, attention_context_left=5),
    "right": dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                  output_proj_dims=16, attention_chunk_size=5, attention_context_left=4, attention_context_right=2,
                  conv_kernel_size=3),
}  # fmt: skip
TOL = 1e-4


def chirp(samples: int, seed: int = 0) -> np.ndarray:
    """A 100 Hz -> 6 kHz sweep with a little noise, float32 in [-1, 1]."""
    t = np.arange(samples) / RATE
    sweep = np.sin(2 * np.pi * (100 * t + (6000 - 100) * t**2 / (2 * max(t[-1], 1e-3))))
    noise = np.random.default_rng(seed).normal(0, 0.05, samples)
    return (0.6 * sweep + noise).astype(np.float32)


def randomize_(model, seed: int):
    """Random weights everywhere, norms around 1, and finite clip bounds so that the clamps bite."""
    from tiny import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.3 if "audio" in name else 0.1
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(scale * torch.randn(param.shape, generator=gen))
        for name, buf in model.named_buffers():
            if name.endswith(("input_min", "output_min")):
                buf.fill_(-1.0 - torch.rand((), generator=gen).item())
            elif name.endswith(("input_max", "output_max")):
                buf.fill_(1.0 + torch.rand((), generator=gen).item())


@functools.lru_cache(maxsize=None)
def oracle(tower: str):
    """(transformers model, its safetensors as saved, our encoder and embedder loaded from them)."""
    import tempfile

    from tiny import VARIANTS, torch

    torch.manual_seed(0)
    config = transformers.Gemma4Config(text_config=VARIANTS["e2b"], vision_config=None, audio_config=TOWERS[tower])
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    randomize_(model, seed=len(tower))
    folder = tempfile.mkdtemp(prefix="audio-oracle-")
    model.save_pretrained(folder)
    weights = mx.load(f"{folder}/model.safetensors")
    audio_config = AudioConfig.from_dict(config.audio_config.to_dict())
    encoder, embedder = AudioEncoder(audio_config), AudioEmbedder(audio_config, config.text_config.hidden_size)
    tower_weights = {k.removeprefix("model.audio_tower."): v for k, v in weights.items() if "audio_tower" in k}
    encoder.load_weights(list(encoder.sanitize(tower_weights).items()), strict=True)
    embedder.load_weights(
        [(k.removeprefix("model.embed_audio."), v) for k, v in weights.items() if "embed_audio" in k], strict=True
    )
    return model, tower_weights, encoder, embedder


def transformers_audio(model, features, mask):
    from tiny import torch

    with torch.no_grad():
        out = model.model.get_audio_features(torch.tensor(features), torch.tensor(mask), return_dict=True)
    return out.last_hidden_state.numpy(), out.pooler_output.numpy(), out.attention_mask.numpy()


@pytest.mark.parametrize("tower", sorted(TOWERS))
@pytest.mark.parametrize("lengths", [[3_200], [5_920], [9_000], [7_360, 2_100]], ids=str)
def test_tower_and_embedder_match_transformers(tower, lengths):
    """Clips of 20/37/56 frames (5/10/14 steps, most not a whole number of chunks), and a batch of two
    lengths whose padding must stay out of the real steps' attention."""
    model, _, encoder, embedder = oracle(tower)
    extractor = feature_extractor({"feature_size": encoder.config.n_mels})
    features, mask = audio_features([chirp(n, seed=n) for n in lengths], extractor)
    hidden, embedded, out_mask = transformers_audio(model, features, mask)

    ours, ours_mask = encoder(mx.array(features), mx.array(mask))
    ours_embedded = embedder(ours)
    assert np.array_equal(np.array(ours_mask), out_mask)
    assert soft_token_counts(mask) == out_mask.sum(axis=1).tolist()
    # Every step, padding included (transformers keeps them; the wrapper drops them by the mask).
    np.testing.assert_allclose(np.array(ours), hidden, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.array(ours_embedded), embedded, atol=TOL, rtol=0)
    assert np.abs(hidden).max() > 0.5  # not a vanishing signal that any code would match


def test_batched_clip_matches_clip_alone():
    """A clip's real steps do not change when a longer clip pads it in a batch."""
    _, _, encoder, _ = oracle("left")
    extractor = feature_extractor({"feature_size": encoder.config.n_mels})
    clips = [chirp(4_000, seed=1), chirp(9_600, seed=2)]
    batch, batch_mask = encoder(*map(mx.array, audio_features(clips, extractor)))
    alone, alone_mask = encoder(*map(mx.array, audio_features(clips[:1], extractor)))
    n = int(np.array(alone_mask).sum())
    assert int(np.array(batch_mask)[0].sum()) == n
    np.testing.assert_allclose(np.array(batch)[0, :n], np.array(alone)[0, :n], atol=TOL, rtol=0)


def test_bfloat16_tower_tracks_float32():
    _, weights, encoder, _ = oracle("left")
    half = AudioEncoder(encoder.config)
    half.load_weights(list(half.sanitize(weights).items()), strict=True)
    half.set_dtype(mx.bfloat16)
    features, mask = audio_features([chirp(6_000)], feature_extractor({"feature_size": encoder.config.n_mels}))
    full = np.array(encoder(mx.array(features), mx.array(mask))[0])
    low = half(mx.array(features), mx.array(mask))[0]
    assert low.dtype == mx.bfloat16
    assert np.abs(np.array(low.astype(mx.float32)) - full).max() < 0.1 * np.abs(full).max()


def test_sanitize_turns_only_channels_first_convolutions():
    _, weights, encoder, _ = oracle("left")
    once = encoder.sanitize(weights)
    name = "subsample_conv_projection.layer1.conv.weight"
    assert weights[name].shape == (8, 16, 3, 3) and once[name].shape == (8, 3, 3, 16)
    assert once["layers.0.lconv1d.depthwise_conv1d.weight"].shape == (32, 5, 1)
    twice = encoder.sanitize(once)  # an MLX-layout (mlx-vlm style) checkpoint passes through unchanged
    for key, value in once.items():
        assert np.array_equal(np.array(twice[key]), np.array(value)), key


def test_wrong_mel_bins_is_one_clear_error():
    _, _, encoder, _ = oracle("left")
    features, mask = audio_features([chirp(3_200)])  # the default 128 bins; this tower reads 16
    with pytest.raises(ValueError, match="128 mel bins.*expects 16"):
        encoder(mx.array(features), mx.array(mask))


def test_config_fields_and_defaults_are_transformers():
    reference = transformers.Gemma4AudioConfig()
    ours = AudioConfig()
    names = set(transformers.Gemma4AudioConfig.__annotations__)
    assert names == {f.name for f in dataclasses.fields(AudioConfig)}
    for name in names:
        value = getattr(reference, name)
        assert getattr(ours, name) == (tuple(value) if isinstance(value, list) else value), name
    saved = transformers.Gemma4AudioConfig(**TOWERS["right"]).to_dict()
    read = AudioConfig.from_dict({**saved, "dtype": "bfloat16"})
    assert read.attention_context_right == 2 and read.subsampling_conv_channels == (8, 4)
    with pytest.raises(ConfigError, match="hidden_act"):
        AudioConfig.from_dict({"hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="model_type"):
        AudioConfig.from_dict({"model_type": "gemma4_vision"})


@pytest.mark.gpu
def test_real_size_tower_on_gpu():
    """E2B/E4B's audio tower at its real size (MLX's random init): the GPU matches MLX's CPU on a
    short clip through 4 layers; prints the GPU time of a 30 s clip through all 12, float32 and bf16."""
    if not (mx.cuda.is_available() or mx.metal.is_available()):
        pytest.skip("no GPU")
    import time

    def log_mel(frames: int) -> tuple[mx.array, mx.array]:  # synthetic: no feature extractor needed there
        return mx.random.normal((1, frames, 128)) - 4.0, mx.arange(frames)[None] < frames - 1

    mx.random.seed(0)
    short = AudioEncoder(AudioConfig(num_hidden_layers=4))
    features, mask = log_mel(200)
    gpu = short(features, mask)[0]
    with mx.stream(mx.cpu):
        cpu = short(features, mask)[0]
    mx.eval(gpu, cpu)
    error = mx.abs(gpu - cpu).max().item() / mx.abs(cpu).max().item()
    print(f"\naudio tower 4 layers, 2 s: GPU vs CPU max abs error / max abs = {error:.2e}")
    assert error < 1e-3

    encoder = AudioEncoder(AudioConfig())
    features, mask = log_mel(3000)  # 30 s: what the feature extractor gives for 480,000 samples
    for dtype in (mx.float32, mx.bfloat16):
        encoder.set_dtype(dtype)
        mx.eval(encoder(features, mask))  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            hidden, out_mask = encoder(features, mask)
            mx.eval(hidden)
        seconds = (time.perf_counter() - start) / 3
        print(f"audio tower 12 layers, 30 s clip ({hidden.shape[1]} steps), {dtype}: {1000 * seconds:.1f} ms")
        assert hidden.shape == (1, 750, 1536) and bool(mx.isfinite(hidden.astype(mx.float32)).all())


# ---- mel features and soft-token counts -------------------------------------------------------


@pytest.mark.parametrize("lengths", [[161], [1_000], [16_000], [16_001, 4_321, 24_000]], ids=str)
def test_features_match_transformers_extractor(lengths):
    """Batched clips: each row equals transformers' extractor on that clip alone, then zero padding."""
    clips = [chirp(n, seed=n) for n in lengths]
    features, mask = audio_features(clips)
    assert features.dtype == np.float32 and mask.dtype == bool and features.shape[-1] == 128
    reference = transformers.Gemma4AudioFeatureExtractor()
    for row, clip in enumerate(clips):
        alone = reference([clip], return_tensors="np")
        frames = alone["input_features"].shape[1]
        np.testing.assert_array_equal(features[row, :frames], alone["input_features"][0])
        np.testing.assert_array_equal(mask[row, :frames], alone["input_features_mask"][0])
        assert not mask[row, frames:].any() and not features[row, frames:].any()
        assert mask[row].sum() == (len(clip) + 160 - 321) // 160 + 1  # whole 20 ms windows of real audio


@pytest.mark.parametrize("samples", [161, 320, 1_000, 15_999, 16_000, 16_321, 480_000])
def test_soft_token_counts_match_transformers_processor(samples):
    """The count the prompt needs: the processor's placeholder count, and its length-only formula."""
    _, mask = audio_features([np.zeros(samples, np.float32)])
    processor = types.SimpleNamespace(boa_token="<boa>", eoa_token="<eoa>", audio_token="@")
    text = transformers.Gemma4Processor.replace_audio_token(processor, {"input_features_mask": mask}, 0)
    lengths = types.SimpleNamespace(feature_extractor=feature_extractor(), audio_seq_length=750)
    expected = transformers.Gemma4Processor._compute_audio_num_tokens(lengths, np.zeros(samples), RATE)
    assert soft_token_counts(mask) == [text.count("@")] == [expected]


def test_too_short_and_bad_waveforms_are_clear_errors():
    with pytest.raises(AudioError, match="too short"):
        audio_features([chirp(16_000), np.zeros(160, np.float32)])
    with pytest.raises(AudioError, match="NaN"):
        audio_features([np.array([0.0, np.nan] * 200, np.float32)])
    with pytest.raises(AudioError, match="1-D float"):
        load_audio(np.zeros((2, 400), np.float32))


def test_longer_than_30_seconds_is_cut_with_a_warning():
    with pytest.warns(UserWarning, match="first 30 s"):
        features, mask = audio_features([np.zeros(481_000, np.float32)])
    assert soft_token_counts(mask) == [750]


# ---- decoding clips ------------------------------------------------------------------------------


def write_wav(path, samples: np.ndarray, rate: int, bits: int = 16):
    """PCM through the standard library's writer; float32 by hand (it writes PCM only)."""
    frames = samples.reshape(len(samples), -1)
    if bits == 16:
        with wave.open(str(path), "wb") as out:
            out.setnchannels(frames.shape[1])
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes((np.clip(frames, -1, 1) * 32767).astype("<i2").tobytes())
        return
    data = frames.astype("<f4").tobytes()
    channels = frames.shape[1]
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * 4 * channels, 4 * channels, 32)
    path.write_bytes(
        b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", 2) + b"xx"
        + b"data" + struct.pack("<I", len(data)) + data
    )  # fmt: skip


def test_wav_pcm16_stereo_and_float32(tmp_path):
    left, right = chirp(4_000, seed=1), chirp(4_000, seed=2)
    write_wav(tmp_path / "stereo.wav", np.stack([left, right], axis=1), RATE)
    loaded = load_audio(tmp_path / "stereo.wav")
    assert loaded.dtype == np.float32 and loaded.shape == (4_000,)
    np.testing.assert_allclose(loaded, (left + right) / 2, atol=2 / 32768)
    write_wav(tmp_path / "float.wav", left, RATE, bits=32)
    np.testing.assert_array_equal(load_audio(str(tmp_path / "float.wav")), left)
    assert np.array_equal(load_audio((tmp_path / "float.wav").read_bytes()), left)


def test_other_rates_are_resampled(tmp_path):
    """A 1 kHz tone at 44.1 kHz comes back as the same tone at 16 kHz."""
    seconds = 0.5

    def tone(rate):
        return np.sin(2 * np.pi * 1000 * np.arange(int(rate * seconds)) / rate).astype(np.float32)

    write_wav(tmp_path / "cd.wav", tone(44_100), 44_100, bits=32)
    loaded = load_audio(tmp_path / "cd.wav")
    assert loaded.shape == (8_000,)
    np.testing.assert_allclose(loaded, tone(RATE), atol=1e-3)
    np.testing.assert_allclose(resample(tone(8_000), 8_000, RATE), tone(RATE), atol=1e-3)


def test_url_source(tmp_path):
    clip = chirp(2_000)
    write_wav(tmp_path / "clip.wav", clip, RATE, bits=32)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        np.testing.assert_array_equal(load_audio(f"{url}/clip.wav"), clip)
        with pytest.raises(AudioError, match="could not download"):
            load_audio(f"{url}/missing.wav")
    finally:
        server.shutdown()


def test_unreadable_sources_are_clear_errors(tmp_path):
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "nothing.wav")
    (tmp_path / "cut.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt ")
    with pytest.raises(AudioError, match="not a complete WAV"):
        load_audio(tmp_path / "cut.wav")
    with pytest.raises(AudioError, match="path, URL, bytes"):
        load_audio(3.5)
    with pytest.raises(AudioError, match="not a WAV file|could not decode"):
        load_audio(b"definitely not audio" * 10)


def test_flac_through_soundfile(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    clip = chirp(3_000)
    soundfile.write(tmp_path / "clip.flac", np.stack([clip, clip], axis=1), 22_050, subtype="PCM_24")
    loaded = load_audio(tmp_path / "clip.flac")
    assert loaded.shape == (round(3_000 * RATE / 22_050),)
    np.testing.assert_allclose(loaded, resample(clip, 22_050, RATE), atol=1e-5)


# ---- full logits through the multimodal wrapper -------------------------------------------------


@pytest.fixture(scope="module")
def audio_checkpoint(tmp_path_factory):
    """A tiny E2B-style Gemma4ForConditionalGeneration with the 'left' audio tower (finite clip bounds) and no
    vision tower, saved with a tokenizer."""
    from tiny import MEDIA_TOKENS, VARIANTS, save_tokenizer, torch

    torch.manual_seed(0)
    config = transformers.Gemma4Config(
        text_config=VARIANTS["e2b"], vision_config=None, audio_config=TOWERS["left"], **MEDIA_TOKENS
    )
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    randomize_(model, seed=7)
    folder = tmp_path_factory.mktemp("audio-e2b")
    model.save_pretrained(folder)
    save_tokenizer(folder, VARIANTS["e2b"]["vocab_size"])
    return folder


def test_logits_with_two_clips_match_transformers(audio_checkpoint):
    """Two clips of different lengths in one prompt: transformers pads them into one batch and keeps the
    real steps; the wrapper runs each alone. Full logits, float32."""
    from tiny import MEDIA_TOKENS, torch

    from mlx_gemma4 import load
    from mlx_gemma4.processing import prepare_inputs

    model, tokenizer = load(audio_checkpoint)
    assert model.has_audio and not model.has_vision
    clips = [chirp(7_000, seed=3), chirp(3_300, seed=4)]
    tokens, media = prepare_inputs(model, tokenizer, "w10 <|audio|> w11 w12 <|audio|> w13", audio=clips)
    extractor = transformers.Gemma4AudioFeatureExtractor(feature_size=TOWERS["left"]["subsampling_conv_channels"][0])
    batch = extractor(clips, return_tensors="pt")
    heard = batch["input_features_mask"][:, ::4].sum(dim=1).tolist()
    assert tokens.count(MEDIA_TOKENS["audio_token_id"]) == sum(heard) and heard[0] != heard[1]
    assert tokens.count(MEDIA_TOKENS["boa_token_id"]) == tokens.count(MEDIA_TOKENS["eoa_token_index"]) == 2

    oracle_model = transformers.Gemma4ForConditionalGeneration.from_pretrained(audio_checkpoint, dtype=torch.float32)
    ids = torch.tensor([tokens])
    with torch.no_grad():
        expected = oracle_model.eval()(
            input_ids=ids,
            mm_token_type_ids=(ids == MEDIA_TOKENS["audio_token_id"]).long() * 3,
            input_features=batch["input_features"],
            input_features_mask=batch["input_features_mask"],
        ).logits[0].numpy()
    logits = np.array(model.run_prompt(tokens, media, model.make_cache(), step=16, all_logits=True)[0])
    assert logits.shape == expected.shape
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=0)


def test_converted_model_answers_audio_prompts_identically(audio_checkpoint, tmp_path):
    """Show 2 for audio: a float32 conversion gives the same logits bit for bit; an 8-bit one keeps the
    audio tower, its clip bounds and embed_audio unquantized, so the audio soft tokens are identical."""
    from mlx_gemma4 import load
    from mlx_gemma4.convert import convert
    from mlx_gemma4.loading import load_model
    from mlx_gemma4.processing import prepare_inputs

    model, tokenizer = load(audio_checkpoint)
    tokens, media = prepare_inputs(model, tokenizer, "w20 <|audio|> w21", audio=[chirp(5_000, seed=5)])
    expected = np.array(model.run_prompt(tokens, media, model.make_cache(), all_logits=True))
    exact = load_model(convert(audio_checkpoint, tmp_path / "f32", dtype="float32"))
    assert np.array_equal(np.array(exact.run_prompt(tokens, media, exact.make_cache(), all_logits=True)), expected)

    eight = load_model(convert(audio_checkpoint, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32))
    assert eight.model.layers[0].self_attn.q_proj.bits == 8
    bound = eight.audio_tower.layers[0].self_attn.q_proj.input_max
    assert np.isfinite(bound.item()) and bound.item() == model.audio_tower.layers[0].self_attn.q_proj.input_max.item()
    heard = [np.array(m.audio_features(media.audio[0])) for m in (eight, model)]
    assert np.array_equal(*heard)
