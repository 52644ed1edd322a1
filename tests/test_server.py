"""The OpenAI-compatible server, live on loopback, driven by the official openai client.

Servers run in this process (uvicorn in a thread, on a free port) so that tests can compare with
direct generation and read MLX's memory. The bundled tiny model never writes tool calls or
thoughts, so those tests wrap it in `Scripted`, which forces a given reply after a given prompt.
"""

import base64
import io
import json
import socket
import struct
import threading
import time
import wave
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from mlx_gemma4 import BUNDLED_MODEL  # noqa: E402
from mlx_gemma4.api import LocalModel, load, load_weights  # noqa: E402
from mlx_gemma4.chat import render_chat  # noqa: E402
from mlx_gemma4.generate import SamplingParams, stream_generate  # noqa: E402
from mlx_gemma4.server.app import create_app  # noqa: E402
from mlx_gemma4.server.engine import Engine  # noqa: E402
from mlx_gemma4.server.media import MediaPolicy  # noqa: E402

MODEL = "gemma4-tiny"
NO_EOS = {"1": -100.0, "6": -100.0, "13": -100.0}  # logit_bias that keeps the tiny model talking
PROMPTS = [
    "What does os.path.join do?",
    "Explain the csv module.",
    "How do I read a file?",
    "What is a context manager?",
    "Describe the json module.",
    "What does str.split return?",
    "How does sorted() work?",
    "What is an iterator?",
]


def serve(lm: LocalModel, **options):
    """Start uvicorn on a free loopback port in a thread; returns (base_url, stop)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(lm, **options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def client(url: str, **options) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=options.pop("api_key", "none"), max_retries=0, **options)


@pytest.fixture(scope="module")
def lm():
    model = load(cached_sessions=4)
    yield model
    model.unload()


@pytest.fixture(scope="module")
def server(lm):
    url, stop = serve(lm)
    yield url
    stop()


def chat(api, content, **options):
    options = {"temperature": 0, "max_tokens": 24, **options}
    return api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **options)


def reference(lm, messages, max_tokens, **render_options):
    """Greedy output of direct generation on a fresh cache (the standard the server must meet)."""
    ids = lm.tokenizer.encode(render_chat(lm.tokenizer, messages, **render_options), add_special_tokens=False)
    pieces = stream_generate(lm.model, lm.tokenizer, ids, max_tokens=max_tokens, sampling=SamplingParams(temperature=0))
    return "".join(piece.text for piece in pieces)


def wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# ---- 1. chat, streaming, completions, models ----


def test_chat_non_streaming_matches_direct_generation(server, lm):
    reply = chat(client(server), PROMPTS[0])
    expected = reference(lm, [{"role": "user", "content": PROMPTS[0]}], 24)
    assert reply.choices[0].message.content == expected.strip()
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens == 24 or reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == lm.count_tokens(messages=[{"role": "user", "content": PROMPTS[0]}])


def test_chat_streaming_equals_non_streaming(server):
    api = client(server)
    whole = chat(api, PROMPTS[1])
    chunks = list(chat(api, PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sampling_options_logprobs_stop_and_seed(server):
    api = client(server)
    greedy = chat(api, PROMPTS[2], max_tokens=8, logprobs=True, top_logprobs=3)
    entries = greedy.choices[0].logprobs.content
    assert len(entries) == greedy.usage.completion_tokens
    for entry in entries:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    text = greedy.choices[0].message.content
    word = text.split()[1]
    stopped = chat(api, PROMPTS[2], max_tokens=8, stop=[word])
    assert stopped.choices[0].message.content == text[: text.index(word)].strip()
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [chat(api, PROMPTS[2], temperature=1.0, seed=7, max_tokens=12,
                    extra_body={"top_k": 40, "min_p": 0.05}).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
    capped = chat(api, PROMPTS[2], max_completion_tokens=3, logit_bias=NO_EOS)
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"


def test_completions_models_and_health(server, lm):
    api = client(server)
    done = api.completions.create(model=MODEL, prompt="The module provides", max_tokens=6, temperature=0, logprobs=2)
    expected = "".join(p.text for p in stream_generate(lm.model, lm.tokenizer, "The module provides", max_tokens=6,
                                                       sampling=SamplingParams(temperature=0)))
    assert done.choices[0].text == expected
    assert len(done.choices[0].logprobs.tokens) == done.usage.completion_tokens
    streamed = api.completions.create(model=MODEL, prompt="The module provides", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert [m.id for m in api.models.list().data] == [MODEL]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["active"] == 0


# ---- tools and thinking (scripted replies) ----


class Scripted:
    """The bundled model, its greedy output forced to `reply` wherever the tokens so far end with
    `trigger` (+ the part of `reply` already written). Logits are the real model's elsewhere."""

    def __init__(self, model, tokenizer, scripts: list[tuple[str, str]]):
        self.model = model
        self.scripts = [(tokenizer.encode(t, add_special_tokens=False), tokenizer.encode(r, add_special_tokens=False))
                        for t, r in scripts]
        self.history = {}  # id(cache list) -> tokens the cache holds

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, logits_to_keep=0):
        tokens = self.history.get(id(cache), [])[: cache[0].offset] + inputs[0].tolist()
        self.history[id(cache)] = tokens
        logits = self.model(inputs, cache=cache, logits_to_keep=logits_to_keep)
        for trigger, reply in self.scripts:
            for written in range(len(reply) - 1, -1, -1):
                tail = trigger + reply[:written]
                if tokens[-len(tail):] == tail:
                    forced = mx.zeros(logits.shape[-1]).at[reply[written]].add(1e4)
                    return mx.concatenate([logits[:, :-1], (logits[:, -1:] + forced).astype(logits.dtype)], axis=1)
        return logits


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>'
ANSWER = "It is sunny in Paris.<turn|>"
THOUGHT = "<|channel>thought\nThe user greets me; answer briefly.<channel|>Hello there!<turn|>"


@pytest.fixture(scope="module")
def scripted_server():
    def loader():
        model, tokenizer = load_weights(str(BUNDLED_MODEL))
        return Scripted(model, tokenizer, [
            ("Weather in Paris?<turn|>\n<|turn>model\n", CALL),
            ("response:get_weather{value:<|\"|>sunny, 24 C<|\"|>}<tool_response|>", ANSWER),
            ("Say hello.<turn|>\n<|turn>model\n", THOUGHT),
        ]), tokenizer

    lm = LocalModel(Engine(loader), MODEL, str(BUNDLED_MODEL))
    url, stop = serve(lm)
    yield url
    stop()
    lm.unload()


def test_tool_call_round_trip(scripted_server):
    api = client(scripted_server)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=40)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    streamed = list(api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                                max_tokens=40, stream=True))
    deltas = [d for c in streamed if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [(0, "get_weather", {"city": "Paris"})]
    assert not "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert streamed[-1].choices[0].finish_reason == "tool_calls"

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 C"}]
    second = api.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=40)
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls


def test_thinking_is_separated_from_content(scripted_server):
    api = client(scripted_server)
    messages = [{"role": "user", "content": "Say hello."}]
    reply = api.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    message = reply.choices[0].message
    assert message.content == "Hello there!"
    assert message.model_extra["reasoning_content"] == "The user greets me; answer briefly."
    chunks = list(api.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40,
                                              stream=True, reasoning_effort="high"))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Hello there!"
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == message.model_extra["reasoning_content"]
    assert not any("<|channel>" in (d.content or "") for d in deltas)


# ---- 2. concurrency ----


def test_concurrent_streams_match_sequential_and_disconnects_free_memory(server, lm):
    api = client(server)
    options = {"max_tokens": 24, "logit_bias": NO_EOS}
    sequential = [chat(api, p, **options).choices[0].message.content for p in PROMPTS]
    lm.engine.clear_sessions()
    wait_for(lambda: lm.engine.stats()["cached_sessions"] == 0)
    mx.synchronize()
    baseline = mx.get_active_memory()
    cancelled_before = lm.engine.stats()["cancelled"]

    def run(index):
        stream = chat(api, PROMPTS[index], stream=True, **{**options, "max_tokens": 2000 if index in (2, 5) else 24})
        text = ""
        for n, chunk in enumerate(stream):
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            if index in (2, 5) and n == 6:
                stream.close()  # disconnect midway
                break
        return text

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(run, range(8)))
    for index, (alone, together) in enumerate(zip(sequential, concurrent)):
        if index in (2, 5):
            assert together and alone.startswith(together.strip())
        else:
            assert together == alone
    # The two abandoned requests (2000 tokens each) are dropped, not run to the end.
    wait_for(lambda: lm.engine.stats()["active"] == 0, seconds=5)
    assert lm.engine.stats()["cancelled"] - cancelled_before == 2
    lm.engine.clear_sessions()
    wait_for(lambda: lm.engine.stats()["cached_sessions"] == 0)
    mx.synchronize()
    # Every request's cache is freed: active memory (MLX's buffer cache excluded) is back where it was
    # (measured: exactly). One leaked request would hold ~100 KiB of KV cache here (3 sliding rings of
    # 95 slots and a 256-slot full cache, bf16), so the tolerance is below one leak.
    assert abs(mx.get_active_memory() - baseline) <= 64 << 10


# ---- 3. bad input ----


def png(size=(8, 8)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_base64() -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1), writer.setsampwidth(2), writer.setframerate(16000)
        writer.writeframes(struct.pack("<160h", *range(160)))
    return base64.b64encode(buffer.getvalue()).decode()


def image_message(*urls):
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}]
             + [{"type": "image_url", "image_url": {"url": url}} for url in urls]}]


def audio_message(data, format="wav"):
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": format}}]}]


def post(url, body, raw=False):
    content = body if raw else json.dumps(body)
    return httpx.post(url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"})


@pytest.fixture(scope="module")
def strict_server(lm, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("media")
    url, stop = serve(lm, media=MediaPolicy(allowed_dir=allowed, max_images=2))
    yield url, allowed
    stop()


BAD_REQUESTS = {
    "malformed JSON": ('{"model": "gemma4-tiny", "messages": [', 400, None),
    "not an object": ('[1, 2]', 400, None),
    "messages missing": ({"model": MODEL}, 400, None),
    "messages of wrong type": ({"model": MODEL, "messages": "hi"}, 400, None),
    "temperature of wrong type": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, None),
    "negative max_tokens": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, None),
    "unknown role": ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    "n > 1": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, None),
    "unknown model": ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    "prompt longer than the context": ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400,
                                       "context_length_exceeded"),
    "tool arguments not JSON": ({"model": MODEL, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
        400, None),
    "bad image base64": ({"model": MODEL, "messages": image_message("data:image/png;base64,@@not-base64@@")}, 400, "invalid_base64"),
    "undecodable image": ({"model": MODEL, "messages": image_message("data:image/png;base64," + base64.b64encode(b"no image").decode())},
                          400, "invalid_image"),
    "too many images": ({"model": MODEL, "messages": image_message(png(), png(), png())}, 400, "too_many_images"),
    "remote image URL": ({"model": MODEL, "messages": image_message("http://169.254.169.254/latest")}, 400, "remote_url_refused"),
    "file outside the allowed folder": ({"model": MODEL, "messages": image_message("/etc/hostname")}, 400, "local_files_refused"),
    "bad audio base64": ({"model": MODEL, "messages": audio_message("%%%")}, 400, "invalid_base64"),
    "undecodable audio": ({"model": MODEL, "messages": audio_message(base64.b64encode(b"RIFF garbage").decode())}, 400, "invalid_audio"),
    "image to a text-only model": ({"model": MODEL, "messages": image_message(png())}, 400, "unsupported_media"),
    "audio to a text-only model": ({"model": MODEL, "messages": audio_message(wav_base64())}, 400, "unsupported_media"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_stays_up(strict_server, case):
    url, _ = strict_server
    body, status, code = BAD_REQUESTS[case]
    response = post(url, body, raw=isinstance(body, str))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and set(error) == {"message", "type", "param", "code"}
    if code:
        assert error["code"] == code
    assert chat(client(url), "hi", max_tokens=2).choices[0].message.role == "assistant"


def test_openai_client_raises_the_right_errors(strict_server):
    url, allowed = strict_server
    api = client(url)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        api.completions.create(model=MODEL, prompt="word " * 9000)
    (allowed / "pic.png").write_bytes(base64.b64decode(png().split(",")[1]))
    inside = api.chat.completions.with_raw_response.create  # a readable file in the allowed folder passes the checks
    with pytest.raises(openai.BadRequestError) as error:
        inside(model=MODEL, messages=image_message(str(allowed / "pic.png")))
    assert error.value.code == "unsupported_media"  # got past the path check; the tiny model has no vision tower
    assert httpx.get(url + "/v1/nowhere").json()["error"]["type"] == "not_found_error"


def test_api_key_timeout_and_backpressure(lm):
    url, stop = serve(lm, api_key="secret", request_timeout=0.5)
    try:
        with pytest.raises(openai.AuthenticationError):
            chat(client(url, api_key="wrong"), "hi", max_tokens=2)
        assert chat(client(url, api_key="secret"), "hi", max_tokens=2).choices[0].message.role == "assistant"
        with pytest.raises(openai.InternalServerError) as error:  # 504: the request ran out of time
            chat(client(url, api_key="secret"), "hi", max_tokens=5000, logit_bias=NO_EOS)
        assert error.value.status_code == 504
        assert httpx.get(url + "/health").json()["status"] == "ok"  # /health needs no key
    finally:
        stop()

    small = load(max_active=1, max_queue=1)
    url, stop = serve(small)
    try:
        api = client(url)
        first = chat(api, "hi", stream=True, max_tokens=5000, logit_bias=NO_EOS)
        next(iter(first))
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(chat, api, "hello", max_tokens=2)
            wait_for(lambda: small.engine.stats()["waiting"] == 1)
            with pytest.raises(openai.InternalServerError) as error:
                chat(api, "third", max_tokens=2)
            assert error.value.status_code == 503
            first.close()
            assert waiting.result().choices[0].message.role == "assistant"
    finally:
        stop()
        small.unload()


# ---- 4. prompt-cache reuse ----


def test_second_turn_reuses_the_cache_and_matches_a_fresh_run(server, lm):
    api = client(server)
    messages = [{"role": "user", "content": "Explain the os module in a few words, please, and give an example."}]
    first = api.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And what does os.path.exists do?"}]
    second = api.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # The whole first turn (past the window of 64: the sliding caches have wrapped) is reused.
    assert first.usage.prompt_tokens + first.usage.completion_tokens > 64
    assert cached >= first.usage.prompt_tokens
    assert second.choices[0].message.content == reference(lm, messages, 40).strip()


# ---- the Python API ----


def test_python_api_progress_cancel_count_info_unload():
    reports = []
    local = load(progress=lambda fraction, stage: reports.append(fraction))
    try:
        assert reports[0] == 0.0 and reports[-1] == 1.0 and reports == sorted(reports) and len(reports) > 3
        info = local.info()
        assert info["name"] == MODEL and info["context_length"] == 8192 and info["parameters"] > 1_000_000
        messages = [{"role": "user", "content": "hi"}]
        assert local.count_tokens(messages=messages) == len(local.encode_chat(messages))
        assert local.count_tokens(text="hello world") == len(local.tokenizer.encode("hello world"))
        run = local.chat(messages, max_tokens=5000, sampling=SamplingParams(temperature=0, logit_bias={1: -100, 6: -100, 13: -100}))
        events = iter(run)
        next(events)
        run.cancel()
        rest = list(events)
        assert run.finished.reason == "cancelled" and run.finished.completion_tokens < 5000 and len(rest) < 5000
        assert local.complete("The module", max_tokens=4).text()
    finally:
        local.unload()
    assert local.engine.stats()["active"] == 0
    with pytest.raises(RuntimeError, match="unloaded"):
        local.chat([{"role": "user", "content": "hi"}])


def test_quantized_kv_cache_server_matches_direct_generation():
    from mlx_gemma4 import KVQuantConfig

    kv_quant = KVQuantConfig("affine", bits=8)
    local = load(kv_quant=kv_quant)
    url, stop = serve(local)
    try:
        reply = chat(client(url), PROMPTS[3])
        ids = local.encode_chat([{"role": "user", "content": PROMPTS[3]}])
        expected = "".join(p.text for p in stream_generate(local.model, local.tokenizer, ids, max_tokens=24,
                                                           sampling=SamplingParams(temperature=0), kv_quant=kv_quant))
        assert reply.choices[0].message.content == expected.strip()
    finally:
        stop()
        local.unload()
