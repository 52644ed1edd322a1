"""Images and audio through the OpenAI-compatible server, on a random tiny multimodal checkpoint (E2B
style: vision and audio towers), driven by the official openai client. Every answer must equal what
the Python API generates for the same messages (greedy), whose own media path decodes the parts itself."""

import base64
import io
import wave
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("PIL")

from test_server import client, post, serve, wait_for  # noqa: E402
from tiny import AUDIO, VISION, save_multimodal  # noqa: E402

from mlx_gemma4 import generate, load as load_direct  # noqa: E402
from mlx_gemma4.api import load  # noqa: E402
from mlx_gemma4.generate import SamplingParams  # noqa: E402
from mlx_gemma4.processing import prepare_inputs  # noqa: E402
from mlx_gemma4.server.media import MediaPolicy  # noqa: E402

NAME = "tiny-mm"
NO_PAD = {"0": -100.0}  # the random model likes <pad>; words make a more telling answer
NO_END = {"0": -100.0, "1": -100.0}  # no <pad>, no <eos>: keeps it talking


def png_bytes(height, width, seed) -> bytes:
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_url(height=48, width=80, seed=0) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(height, width, seed)).decode()


def wav_base64(seconds, seed=0) -> str:
    """A 16-bit mono 16 kHz chirp with a little noise."""
    t = np.arange(int(16_000 * seconds)) / 16_000
    samples = 0.5 * np.sin(2 * np.pi * (200 + 400 * t) * t) + 0.05 * np.random.RandomState(seed).randn(len(t))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16_000)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return base64.b64encode(buffer.getvalue()).decode()


def image_messages(url, text="w10 w11"):
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


def audio_messages(data, text="w20"):
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                                         {"type": "text", "text": text}]}]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # A context of 1024 (the tiny configs' 512 doubled): an abandoned stream has ~900 tokens of room, so its
    # disconnect is seen before it could run to its length on a busy 2-core host; a 1120-token image still
    # overflows it.
    return save_multimodal("e2b", tmp_path_factory.mktemp("mm") / "e2b", seed=1, vision=VISION, audio=AUDIO,
                           max_position_embeddings=1024)


@pytest.fixture(scope="module")
def served(checkpoint, tmp_path_factory):
    """(url, LocalModel, allowed media folder) of a live server on the checkpoint."""
    allowed = tmp_path_factory.mktemp("allowed")
    lm = load(str(checkpoint), name=NAME, cached_sessions=4)
    url, stop = serve(lm, media=MediaPolicy(allowed_dir=allowed, max_images=2))
    yield url, lm, allowed
    stop()
    lm.unload()


@pytest.fixture(scope="module")
def direct(checkpoint):
    """The same checkpoint loaded for the Python API, on this thread."""
    return load_direct(checkpoint)


def ask(url, messages, budget=70, **options):
    options = {"temperature": 0, "max_tokens": 8, "logit_bias": NO_PAD, **options}
    extra = {"max_image_tokens": budget} if budget else {}
    return client(url).chat.completions.create(model=NAME, messages=messages, extra_body=extra, **options)


def expected(direct, messages, budget=70, max_tokens=8, bias=NO_PAD) -> str:
    model, tokenizer = direct
    sampling = SamplingParams(temperature=0, logit_bias={int(k): v for k, v in bias.items()})
    return generate(model, tokenizer, messages, image_tokens=budget, max_tokens=max_tokens, sampling=sampling).strip()


def prompt_length(direct, messages, budget=70) -> int:
    return len(prepare_inputs(*direct, messages, image_tokens=budget)[0])


def test_image_request_matches_the_python_api_streamed_too(served, direct):
    url, _, _ = served
    messages = image_messages(image_url())
    reply = ask(url, messages)
    text = reply.choices[0].message.content
    assert text == expected(direct, messages) and text
    assert reply.usage.prompt_tokens == prompt_length(direct, messages)
    chunks = list(ask(url, messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    # The image-token budget reaches prepare_inputs: 140 soft tokens lay out a longer prompt.
    wider = ask(url, messages, budget=140)
    assert wider.usage.prompt_tokens == prompt_length(direct, messages, 140) > reply.usage.prompt_tokens
    assert wider.choices[0].message.content == expected(direct, messages, 140)


def test_audio_request_matches_the_python_api(served, direct):
    url, _, _ = served
    messages = audio_messages(wav_base64(1.1))
    reply = ask(url, messages, budget=None)
    text = reply.choices[0].message.content
    assert text == expected(direct, messages, None) and text
    assert reply.usage.prompt_tokens == prompt_length(direct, messages, None)


def test_local_file_in_the_allowed_folder_answers_as_its_data_url(served, direct):
    url, _, allowed = served
    (allowed / "dots.png").write_bytes(png_bytes(40, 40, 3))
    by_path = ask(url, image_messages(str(allowed / "dots.png")))
    by_data = ask(url, image_messages(image_url(40, 40, 3)))
    assert by_path.choices[0].message.content == by_data.choices[0].message.content
    assert by_path.usage.prompt_tokens == by_data.usage.prompt_tokens


def test_media_prompts_interleave_cancel_and_leave_the_sessions_alone(served):
    url, lm, _ = served
    requests = [image_messages(image_url(seed=5)), audio_messages(wav_base64(0.8, 1)),
                [{"role": "user", "content": "w10 w11 w12"}], image_messages(image_url(30, 60, 6), "w30")]  # fmt: skip
    alone = [ask(url, m, max_tokens=12).choices[0].message.content for m in requests]
    lm.engine.clear_sessions()
    wait_for(lambda: lm.engine.stats()["cached_sessions"] == 0)
    # A cached text conversation that a media prompt continues is neither taken nor trimmed.
    words = [{"role": "user", "content": " ".join(f"w{i}" for i in range(10, 50))}]
    ask(url, words, budget=None, max_tokens=2)
    reused = ask(url, words, budget=None, max_tokens=2).usage.prompt_tokens_details.cached_tokens
    assert reused > 30
    ask(url, image_messages(image_url(), words[0]["content"]))
    assert ask(url, words, budget=None, max_tokens=2).usage.prompt_tokens_details.cached_tokens == reused
    wait_for(lambda: lm.engine.stats()["cached_sessions"] == 1)
    lm.engine.clear_sessions()
    wait_for(lambda: lm.engine.stats()["cached_sessions"] == 0)
    mx.synchronize()
    baseline = mx.get_active_memory()
    cancelled_before = lm.engine.stats()["cancelled"]

    def run(index):
        if index == len(requests):  # a long media stream, abandoned midway
            stream = ask(url, requests[0], max_tokens=2000, logit_bias=NO_END, stream=True)
            for n, _ in enumerate(stream):
                if n == 3:
                    stream.close()
                    return None
        stream = ask(url, requests[index], max_tokens=12, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(len(requests) + 1) as pool:
        together = list(pool.map(run, range(len(requests) + 1)))
    assert together[:-1] == alone
    wait_for(lambda: lm.engine.stats()["active"] == 0, seconds=5)
    assert lm.engine.stats()["cancelled"] - cancelled_before == 1
    # The text request's cache may be kept (it continues nothing cached); no media prompt's is.
    assert lm.engine.stats()["cached_sessions"] <= 2
    lm.engine.clear_sessions()
    wait_for(lambda: lm.engine.stats()["cached_sessions"] == 0)
    mx.synchronize()
    # Every media run's cache and tower activations are freed (measured: exactly).
    assert abs(mx.get_active_memory() - baseline) <= 16 << 10


def short_wav() -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16_000)
        out.writeframes(np.zeros(100, "<i2").tobytes())
    return base64.b64encode(buffer.getvalue()).decode()


BAD_MEDIA = {
    "undecodable image": (image_messages("data:image/png;base64," + base64.b64encode(b"no image").decode()), 70,
                          "invalid_image"),
    "too many images": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(seed=s)}}
                                                      for s in range(3)]}], 70, "too_many_images"),
    "remote image URL": (image_messages("https://example.com/cat.png"), 70, "remote_url_refused"),
    "file outside the allowed folder": (image_messages("/etc/hostname"), 70, "local_files_refused"),
    "unsupported image budget": (image_messages(image_url()), 100, None),
    "image past the context": (image_messages(image_url(240, 400)), 1120, "context_length_exceeded"),
    "image marker typed in the text": (image_messages(image_url(), "w10 <|image|>"), 70, None),
    "bad audio base64": (audio_messages("%%%"), None, "invalid_base64"),
    "undecodable audio": (audio_messages(base64.b64encode(b"RIFF garbage").decode()), None, "invalid_audio"),
    "audio shorter than one frame": (audio_messages(short_wav()), None, "invalid_audio"),
}


@pytest.mark.parametrize("case", BAD_MEDIA)
def test_bad_media_gets_an_openai_error_and_the_server_stays_up(served, case):
    url, lm, _ = served
    messages, budget, code = BAD_MEDIA[case]
    body = {"model": NAME, "messages": messages, **({"max_image_tokens": budget} if budget else {})}
    response = post(url, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    if code:
        assert error["code"] == code
    assert lm.engine.stats()["failed"] == 0
    assert ask(url, image_messages(image_url(seed=9)), max_tokens=1).choices[0].message.role == "assistant"
