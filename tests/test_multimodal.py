"""The multimodal wrapper against transformers' Gemma4ForConditionalGeneration on random tiny checkpoints:
full logits of prompts with images and video (float32), PLE at media positions (E2B-style), the
bidirectional image mask on sliding layers only (26B-style), chunked prefill that never splits an
image, loading, conversion, prompts and errors."""

import numpy as np
import pytest

import mlx.core as mx

from tiny import AUDIO, MEDIA_TOKENS, VISION, save_multimodal, torch, transformers

from mlx_gemma4 import load
from mlx_gemma4.loading import load_model
from mlx_gemma4.model.gemma4 import Model as MultimodalModel, chunk_ranges
from mlx_gemma4.processing import prepare_inputs

TOL = 1e-4


def write_wav(path, seconds: float, seed: int):
    """A 16-bit mono 16 kHz chirp with a little noise."""
    import wave

    t = np.arange(int(16_000 * seconds)) / 16_000
    samples = 0.5 * np.sin(2 * np.pi * (200 + 400 * t) * t) + 0.05 * np.random.RandomState(seed).randn(len(t))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16_000)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def make_image(height, width, seed):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    return {
        "e2b": save_multimodal("e2b", root / "e2b", seed=1, vision=VISION, audio=AUDIO),
        # 26B style: MoE, k_eq_v, and bidirectional attention inside images on sliding layers.
        "26b": save_multimodal("26b", root / "26b", seed=2, vision=VISION, use_bidirectional_attention="vision"),
    }


def oracle(folder, tokens, media, pooling=3, dtype=torch.float32):
    """transformers' logits [L, vocab] for our prompt tokens and media (pixels padded as its processors
    pad), and its soft tokens in text space: one array per image/video (images first), one per audio clip."""
    # float64 (the judge) needs the experts' plain loop: grouped_mm has no double kernel.
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(folder, dtype=dtype, experts_implementation="eager").eval()
    ids = torch.tensor([tokens])
    types = torch.zeros_like(ids)
    types[ids == MEDIA_TOKENS["image_token_id"]] = 1
    types[ids == MEDIA_TOKENS["video_token_id"]] = 2
    types[ids == MEDIA_TOKENS["audio_token_id"]] = 3
    kwargs, features, heard = dict(input_ids=ids, mm_token_type_ids=types), [], []
    with torch.no_grad():
        if media.images:
            pixels, positions = padded(media.images, pooling)
            kwargs.update(pixel_values=pixels.to(dtype), image_position_ids=positions)
            features += model.model.get_image_features(pixels.to(dtype), positions).pooler_output
        if media.videos:
            pixels, positions = padded(media.videos, pooling)
            frames = torch.tensor([v.pixels.shape[0] for v in media.videos])
            kwargs.update(pixel_values_videos=pixels.to(dtype), video_position_ids=positions, num_frames_per_video=frames)
            features += model.model.get_video_features(pixels.to(dtype), positions, frames).pooler_output
        for clip in media.audio:  # one clip per call: no padding between clips
            clip_features = torch.tensor(clip.features[None]).to(dtype)
            clip_mask = torch.tensor(clip.mask[None])
            out = model.model.get_audio_features(clip_features, clip_mask)
            heard.append(out.pooler_output[out.attention_mask])
        if media.audio:
            assert len(media.audio) == 1, "transformers pads clips to one length; the oracle takes one"
            kwargs.update(input_features=clip_features, input_features_mask=clip_mask)
        logits = model(**kwargs).logits[0].double().numpy()
    return logits, [f.float().numpy() for f in features], [a.float().numpy() for a in heard]


def check_logits(model, folder, tokens, media, step=512):
    """Full logits against transformers, float32, three ways:
    - its soft tokens fed to our decoder (scatter, PLE, masks, chunking): <= 1e-4;
    - our tower's soft tokens against its: <= 1e-4;
    - end to end: <= 1e-3. The towers' float32 rounding (~5e-6 relative; transformers' float32 run is
      as far from its float64 run as ours) is amplified at image positions by the random tiny decoder
      to 1e-4..3e-4, in transformers' float32 run against its float64 run too."""
    expected, features, heard = oracle(folder, tokens, media)
    for item, theirs in zip(media.images + media.videos, features):
        assert np.abs(np.array(model.image_features(item)) - theirs).max() <= TOL
    for item, theirs in zip(media.audio, heard):
        assert np.abs(np.array(model.audio_features(item)) - theirs).max() <= TOL
    end_to_end = ours(model, tokens, media, step)
    seen, listened = iter(features), iter(heard)
    model.image_features = lambda item: mx.array(next(seen))
    model.audio_features = lambda item: mx.array(next(listened))
    assert np.abs(ours(model, tokens, media, step) - expected).max() <= TOL
    del model.image_features, model.audio_features
    assert np.abs(end_to_end - expected).max() <= 10 * TOL


def padded(items, pooling, budget=None):
    """Frames padded to the largest budget's patch count with (-1, -1) positions, as transformers pads."""
    length = max(it.pixels.shape[1] for it in items) if budget is None else budget * pooling**2
    pixels, positions = [], []
    for item in items:
        for frame in item.pixels:
            pad = length - frame.shape[0]
            pixels.append(np.pad(frame, ((0, pad), (0, 0))))
            positions.append(np.pad(item.positions(), ((0, pad), (0, 0)), constant_values=-1))
    return torch.tensor(np.stack(pixels)), torch.tensor(np.stack(positions))


def ours(model, tokens, media, step=512):
    return np.array(model.run_prompt(tokens, media, model.make_cache(), step=step, all_logits=True)[0])


@pytest.mark.parametrize("variant", ["e2b", "26b"])
def test_logits_with_images_match_transformers(checkpoints, variant):
    model, tokenizer = load(checkpoints[variant])
    assert isinstance(model, MultimodalModel)
    images = [make_image(30, 70, 0), make_image(64, 40, 1)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w10 w11"},
                                             {"type": "image"}, {"type": "text", "text": "w12"}]}]  # fmt: skip
    tokens, media = prepare_inputs(model, tokenizer, messages, images=images, image_tokens=70)
    assert sum(im.soft_tokens(3) for im in media.images) == tokens.count(MEDIA_TOKENS["image_token_id"])
    # Chunks of 16 tokens: every image (tens of tokens, longer than the window of 8) stays in one chunk.
    check_logits(model, checkpoints[variant], tokens, media, step=16)


def test_bidirectional_mask_is_what_makes_26b_match(checkpoints):
    """Without the image-span overlay the 26B-style logits move: the test above would catch a wrong mask."""
    model, tokenizer = load(checkpoints["26b"])
    tokens, media = prepare_inputs(model, tokenizer, "w20 <|image|> w21", images=[make_image(40, 40, 3)], image_tokens=70)
    expected = oracle(checkpoints["26b"], tokens, media)[0]
    model.vision_blocks = lambda tokens: None
    assert np.abs(ours(model, tokens, media) - expected).max() > 1e-2


def test_logits_with_video_match_transformers(checkpoints):
    model, tokenizer = load(checkpoints["e2b"])
    frames = [make_image(36, 60, 10 + i) for i in range(5)]
    tokens, media = prepare_inputs(model, tokenizer, "w30 <|video|> w31", videos=[frames], video_frames=3)
    video = media.videos[0]
    assert video.pixels.shape[0] == 3 and video.timestamps == [0.0, 1 / 24, 3 / 24]
    assert tokens.count(MEDIA_TOKENS["video_token_id"]) == 3 * video.soft_tokens(3)
    assert tokens.count(MEDIA_TOKENS["boi_token_id"]) == 3
    check_logits(model, checkpoints["e2b"], tokens, media, step=24)


def test_logits_with_audio_and_image_match_transformers(checkpoints, tmp_path):
    model, tokenizer = load(checkpoints["e2b"])
    assert model.has_audio and model.has_vision
    clip = write_wav(tmp_path / "clip.wav", 1.3, 0)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": str(clip)}, {"type": "text", "text": "w70"},
                                             {"type": "image", "image": make_image(40, 40, 8)}]}]  # fmt: skip
    tokens, media = prepare_inputs(model, tokenizer, messages, image_tokens=70)
    assert tokens.count(MEDIA_TOKENS["audio_token_id"]) == int(media.audio[0].mask[::4].sum()) > 0
    start = tokens.index(MEDIA_TOKENS["boa_token_id"])
    assert tokens[start + 1 : start + 3] == [MEDIA_TOKENS["audio_token_id"]] * 2
    check_logits(model, checkpoints["e2b"], tokens, media, step=16)


def test_video_files_decode_and_sample_like_transformers(tmp_path):
    """An MP4 (PyAV) and an animated GIF (Pillow): 32 frames at most, uniformly sampled, timestamped."""
    from mlx_gemma4.processing import load_video

    av = pytest.importorskip("av")
    frames = [(np.random.RandomState(i).rand(48, 64, 3) * 255).astype(np.uint8) for i in range(40)]
    with av.open(str(tmp_path / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    sampled, times = load_video(tmp_path / "clip.mp4")
    assert len(sampled) == 32 and sampled[0].size == (64, 48)
    assert times == [i * 40 // 32 / 10 for i in range(32)]  # transformers' default_sample_indices_fn
    make_image(48, 64, 0).save(tmp_path / "anim.gif", save_all=True, duration=250,
                               append_images=[make_image(48, 64, i) for i in (1, 2)])  # fmt: skip
    sampled, times = load_video(tmp_path / "anim.gif")
    assert len(sampled) == 3 and times == [0.0, 0.25, 0.5]


def test_generation_with_image_is_greedy_oracle(checkpoints):
    """Decoding after a multimodal prefill continues in text: 4 greedy tokens equal transformers'."""
    from mlx_gemma4 import generate

    model, tokenizer = load(checkpoints["e2b"])
    image = make_image(50, 50, 4)
    tokens, media = prepare_inputs(model, tokenizer, "w40 <|image|> w41", images=[image], image_tokens=70)
    hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(checkpoints["e2b"], dtype=torch.float32).eval()
    pixels, positions = padded(media.images, 3, budget=70)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([tokens]), pixel_values=pixels, image_position_ids=positions,
                          max_new_tokens=4, do_sample=False, eos_token_id=None)  # fmt: skip
    expected = out[0, len(tokens):].tolist()
    from mlx_gemma4.generate import SamplingParams, stream_generate

    responses = list(stream_generate(model, tokenizer, tokens, max_tokens=4, media=media,
                                     sampling=SamplingParams(temperature=0.0)))  # fmt: skip
    assert [r.token for r in responses] == expected
    # The public API's images= path lays out the same prompt and says the same.
    text = generate(model, tokenizer, "w40 <|image|> w41", images=[image], image_tokens=70, max_tokens=4,
                    sampling=SamplingParams(temperature=0.0))  # fmt: skip
    assert text == "".join(r.text for r in responses)


def test_chunks_never_split_a_media_run():
    media = np.array([0, 0, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0], bool)
    assert chunk_ranges(media, 4) == [(0, 2), (2, 6), (6, 10), (10, 12)]
    assert chunk_ranges(media, 3) == [(0, 2), (2, 6), (6, 9), (9, 12)]  # a run longer than a chunk grows it
    assert chunk_ranges(np.array([0, 1, 1, 1, 0], bool), 2) == [(0, 1), (1, 4), (4, 5)]
    assert chunk_ranges(np.zeros(5, bool), 2) == [(0, 2), (2, 4), (4, 5)]


def test_prompt_layout_and_errors(checkpoints):
    model, tokenizer = load(checkpoints["e2b"])
    image = make_image(30, 30, 5)
    tokens, media = prepare_inputs(model, tokenizer, "w50", images=[image], image_tokens=70)
    n = media.images[0].soft_tokens(3)
    ids = MEDIA_TOKENS
    assert tokens[:n + 3] == [tokenizer.bos_token_id, ids["boi_token_id"], *[ids["image_token_id"]] * n, ids["eoi_token_id"]]
    # OpenAI-style parts carry their sources (a data: URL here); arguments given instead fill the parts.
    import base64
    import io

    png = io.BytesIO()
    image.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    carried = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "w50"}]}]
    placeholder = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w50"}]}]
    from_parts, parts_media = prepare_inputs(model, tokenizer, carried, image_tokens=70)
    assert from_parts == prepare_inputs(model, tokenizer, placeholder, images=[image], image_tokens=70)[0]
    assert np.array_equal(parts_media.images[0].pixels, media.images[0].pixels)
    with pytest.raises(ValueError, match="image part names no source"):
        prepare_inputs(model, tokenizer, placeholder)
    with pytest.raises(ValueError, match="token budget 100"):
        prepare_inputs(model, tokenizer, "w50", images=[image], image_tokens=100)
    with pytest.raises(ValueError, match="2 <\\|image\\|> markers but 1 image"):
        prepare_inputs(model, tokenizer, "<|image|> <|image|>", images=[image])
    with pytest.raises(ValueError, match="not a file"):
        prepare_inputs(model, tokenizer, "w50", images=["/nonexistent.png"])
    with pytest.raises(ValueError, match="placeholder tokens"):
        model.run_prompt(tokens[:-5] + tokens[-1:], media, model.make_cache())


def test_budgets_scale_soft_tokens(checkpoints):
    model, tokenizer = load(checkpoints["e2b"])
    image = make_image(300, 500, 6)
    counts = [prepare_inputs(model, tokenizer, "", images=[image], image_tokens=b)[0].count(MEDIA_TOKENS["image_token_id"])
              for b in (70, 140, 280)]  # fmt: skip
    assert counts[0] < counts[1] < counts[2] <= 280 and counts[0] <= 70


def test_text_only_checkpoint_and_text_prompts_unchanged(checkpoints, tmp_path):
    """A checkpoint without towers loads the text model; the wrapper's text path equals it."""
    from tiny import save_causal_lm

    folder = save_causal_lm("e2b", tmp_path / "text")
    assert not isinstance(load_model(folder), MultimodalModel)
    model = load_model(checkpoints["e2b"])
    ids = mx.array([[2, 10, 11, 12, 13]])
    hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(checkpoints["e2b"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(np.array(ids))).logits.numpy()
    assert np.abs(np.array(model(ids)) - expected).max() <= TOL


def test_converted_model_answers_image_and_audio_prompts_identically(checkpoints, tmp_path):
    """Show 2: float32 conversions answer media prompts exactly as their sources (26B style: split experts,
    bidirectional images; E2B style: image and audio); an 8-bit one keeps its towers unquantized: the
    soft tokens are identical, only the decoder's rounding moves the logits (this random tiny decoder is
    sensitive to it; quantization quality is measured on trained weights elsewhere)."""
    from mlx_gemma4.convert import convert

    image, clip = make_image(40, 60, 7), write_wav(tmp_path / "clip.wav", 0.7, 2)
    prompts = {"26b": ("w60 <|image|> w61", [image], []), "e2b": ("w60 <|audio|> w61 <|image|>", [image], [clip])}
    for variant, (prompt, images, audio) in prompts.items():
        model, tokenizer = load(checkpoints[variant])
        tokens, media = prepare_inputs(model, tokenizer, prompt, images=images, audio=audio, image_tokens=70)
        converted = load_model(convert(checkpoints[variant], tmp_path / variant, dtype="float32"))
        assert np.array_equal(ours(converted, tokens, media), ours(model, tokens, media))
    quantized = load_model(convert(checkpoints["e2b"], tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32))
    assert quantized.model.layers[0].self_attn.q_proj.bits == 8
    for ours_, theirs in ((quantized.image_features(media.images[0]), model.image_features(media.images[0])),
                          (quantized.audio_features(media.audio[0]), model.audio_features(media.audio[0]))):  # fmt: skip
        assert np.array_equal(np.array(ours_), np.array(theirs))
    got = ours(quantized, tokens, media)
    assert np.isfinite(got).all() and not np.array_equal(got, ours(model, tokens, media))


def test_cli_end_to_end_with_generated_image_and_audio(checkpoints, tmp_path):
    """`python -m mlx_gemma4.generate --image ... --audio ...` prints what the Python API generates for
    the same chat message, and counts the soft tokens in its prompt."""
    import re
    import subprocess
    import sys

    from mlx_gemma4 import generate
    from mlx_gemma4.generate import SamplingParams

    image, clip = tmp_path / "dots.png", write_wav(tmp_path / "clip.wav", 0.9, 1)
    make_image(48, 80, 9).save(image)
    folder = checkpoints["e2b"]
    args = ["--model", str(folder), "--image", str(image), "--audio", str(clip), "--image-tokens", "70",
            "--prompt", "w10 w11", "--max-tokens", "6", "--temp", "0", "--verbose"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "mlx_gemma4.generate", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    model, tokenizer = load(folder)
    message = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "audio", "audio": str(clip)},
                                            {"type": "text", "text": "w10 w11"}]}]  # fmt: skip
    tokens, _ = prepare_inputs(model, tokenizer, message, image_tokens=70)
    assert re.search(rf"prompt: {len(tokens)} tokens", out.stderr), out.stderr
    expected = generate(model, tokenizer, message, image_tokens=70, max_tokens=6, sampling=SamplingParams(temperature=0.0))
    assert out.stdout.strip() == expected.strip() and expected.strip()



def test_cli_bad_image_is_one_line(checkpoints, tmp_path, capsys):
    from mlx_gemma4.cli import generate_main

    with pytest.raises(SystemExit) as exit_:
        generate_main(["--model", str(checkpoints["e2b"]), "--image", str(tmp_path / "none.png")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and "none.png is not a file" in err
