"""The HTTP app: OpenAI's /v1/chat/completions, /v1/completions and /v1/models, and /health.

Requests are validated (protocol.py, media.py), rendered with the Gemma 4 chat template (images and
audio become their soft-token placeholders: processing.prepare_inputs), and handed
to the engine's worker thread as jobs; its tokens come back through an asyncio queue. Output is
split by chat.OutputParser into content, reasoning_content and tool_calls, streamed as deltas.
A client that goes away cancels its job; every failure is an OpenAI-style error body.
"""

import asyncio
import json
import time
import uuid
from typing import Optional

import mlx.core as mx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..api import LocalModel
from ..chat import OutputParser
from ..audio_features import AudioError
from ..generate import SamplingParams
from ..processing import prepare_inputs
from . import media as media_parts
from .engine import Failed, Finished, Job, Overloaded, Token
from .protocol import APIError, ChatRequest, CompletionRequest, validation_message

OPEN_PATHS = ("/health",)


def create_app(lm: LocalModel, api_key: Optional[str] = None, media: Optional[media_parts.MediaPolicy] = None,
               request_timeout: Optional[float] = 600.0) -> FastAPI:
    app = FastAPI(title="mlx-gemma4", version="0.1.0")
    app.state.lm = lm
    media = media or media_parts.MediaPolicy()
    started = int(time.time())

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key and request.url.path not in OPEN_PATHS:
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                error = APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                                 code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error: RequestValidationError):
        message, param = validation_message(error.errors())
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(error.status_code, str(error.detail), type=kind).body(), status_code=error.status_code)

    @app.exception_handler(Overloaded)
    async def overloaded(request, error: Overloaded):
        body = APIError(503, str(error), type="server_overloaded").body()
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal(request, error: Exception):
        body = APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": lm.name, **lm.engine.stats(),
                "memory": {"active_bytes": mx.get_active_memory(), "peak_bytes": mx.get_peak_memory(),
                           "prompt_cache_bytes": lm.engine.sessions.nbytes}}

    def model_card():
        return {"id": lm.name, "object": "model", "created": started, "owned_by": "mlx-gemma4",
                "context_length": lm.context_length}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(lm, model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(lm, body.model)
        found = await asyncio.to_thread(media_parts.collect, body.messages, media)  # decoding is CPU work
        if found.images and not lm.info()["vision"] or found.audio and not lm.info()["audio"]:
            kind = "images" if found.images else "audio"
            raise APIError(400, f"model {lm.name!r} does not take {kind} (its checkpoint has no such tower)",
                           param="messages", code="unsupported_media")
        prompt = render(lm, body)
        ids, prompt_media = await encode_chat(lm, prompt, found, body.max_image_tokens)
        top = (body.top_logprobs or 0) if body.logprobs else None
        job = make_job(lm, ids, body.max_completion_tokens or body.max_tokens, body, top, request_timeout, prompt_media)
        output = ChatOutput(OutputParser.for_prompt(prompt), lm.tokenizer, body.logprobs)
        reply = Reply("chat.completion", lm.name, job, len(ids))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream(reply, request, lambda item: output.chunks(item), include_usage)
        finished = await reply.run(request, output.add)
        message = output.message()
        choice = {"index": 0, "message": message, "finish_reason": output.finish_reason(finished.reason),
                  "logprobs": {"content": output.logprobs} if body.logprobs else None}
        return reply.body([choice], finished)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(lm, body.model)
        if isinstance(body.prompt, str):
            ids = lm.encode_text(body.prompt)
        else:
            ids = body.prompt
            if min(ids) < 0 or max(ids) >= lm.model.config.vocab_size:
                raise APIError(400, f"prompt token ids must lie in [0, {lm.model.config.vocab_size})", param="prompt")
        job = make_job(lm, ids, body.max_tokens or 16, body, body.logprobs, request_timeout)
        output = CompletionOutput(lm.tokenizer, body.logprobs)
        reply = Reply("text_completion", lm.name, job, len(ids))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream(reply, request, lambda item: output.chunks(item), include_usage)
        finished = await reply.run(request, output.add)
        choice = {"index": 0, "text": output.text, "finish_reason": finished.reason, "logprobs": output.logprobs()}
        return reply.body([choice], finished)

    return app


def check_model(lm: LocalModel, name: str):
    if name not in (lm.name, lm.path):
        raise APIError(404, f"the model {name!r} does not exist; this server serves {lm.name!r}",
                       param="model", code="model_not_found")


def render(lm: LocalModel, body: ChatRequest) -> str:
    """The Gemma 4 prompt for a chat request: tools after tool_choice, thinking after the extensions."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice
    if choice == "none":
        tools = []
    elif choice is not None and not isinstance(choice, str):  # one named function; "required" acts as "auto"
        tools = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not tools:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice")
    thinking = (body.chat_template_kwargs or {}).get("enable_thinking")
    if thinking is None:
        thinking = body.reasoning_effort in ("low", "medium", "high")
    messages = []
    for message in body.messages:
        entry = message.model_dump(exclude_none=True)
        if entry["role"] == "developer":
            entry["role"] = "system"
        messages.append(entry)
    try:
        return lm.render(messages, tools, bool(thinking))
    except ValueError as error:  # e.g. tool-call arguments that are not JSON
        raise APIError(400, str(error), param="messages") from None
    except Exception as error:  # the template's own raise_exception
        raise APIError(400, f"the messages cannot be rendered: {error}", param="messages") from None


async def encode_chat(lm: LocalModel, prompt: str, found: media_parts.MessageMedia, image_tokens: Optional[int]):
    """(token ids, Media or None) of a rendered chat prompt. With images or audio, prepare_inputs
    expands each <|image|>/<|audio|> marker into its placeholders and computes the pixels and mel
    features (in a thread: CPU work that would stall the other clients' streams). It is given the
    decoded media, so it reads no source itself."""
    if not (found.images or found.audio):
        return lm.tokenizer.encode(prompt, add_special_tokens=False), None
    try:
        return await asyncio.to_thread(prepare_inputs, lm.model, lm.tokenizer, prompt, images=found.images,
                                       audio=found.audio, image_tokens=image_tokens)
    except AudioError as error:  # e.g. a clip shorter than one analysis frame
        raise APIError(400, f"the audio cannot be used: {error}", param="messages", code="invalid_audio") from None
    except ValueError as error:  # e.g. <|image|> typed in a message's text: markers and media disagree
        raise APIError(400, f"the media cannot be placed in the prompt: {error}", param="messages") from None


def make_job(lm: LocalModel, ids: list, max_tokens: Optional[int], body, top_logprobs, timeout,
             media=None) -> Job:
    room = lm.context_length - len(ids)
    if room <= 0:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context holds {lm.context_length}",
                       param="messages" if isinstance(body, ChatRequest) else "prompt", code="context_length_exceeded")
    bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
    if any(k >= lm.model.config.vocab_size for k in bias):
        raise APIError(400, f"logit_bias token ids must lie in [0, {lm.model.config.vocab_size})", param="logit_bias")
    sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                              repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, logit_bias=bias or None, seed=body.seed)
    return Job(prompt=list(ids), emit=None, max_tokens=min(max_tokens or room, room), sampling=sampling,
               stop=tuple(body.stop or ()), top_logprobs=top_logprobs, timeout=timeout, media=media)


class Reply:
    """One job's trip through the engine, and the envelope of what is sent back."""

    def __init__(self, kind: str, model: str, job: Job, prompt_tokens: int):
        self.kind, self.model, self.job, self.prompt_tokens = kind, model, job, prompt_tokens
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.items: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(item):
            try:
                loop.call_soon_threadsafe(self.items.put_nowait, item)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                job.cancel()

        job.emit = emit

    async def next(self, request: Request):
        """The job's next item; cancels the job when the client has gone away."""
        while True:
            try:
                return await asyncio.wait_for(self.items.get(), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.job.cancel()
                    raise asyncio.CancelledError("client disconnected") from None

    async def run(self, request: Request, add) -> Finished:
        """Run to the end (non-streaming), passing each token to `add`."""
        request.app.state.lm.engine.submit(self.job)
        try:
            while True:
                item = await self.next(request)
                if isinstance(item, Token):
                    add(item)
                elif isinstance(item, Failed):
                    raise failure(item)
                else:
                    return item
        finally:
            self.job.cancel()  # a no-op once finished; stops the work when this handler is cancelled

    def envelope(self, choices: list) -> dict:
        return {"id": self.id, "object": self.kind + ("" if self.kind == "text_completion" else ".chunk"),
                "created": self.created, "model": self.model, "choices": choices}

    def usage(self, finished: Finished) -> dict:
        return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
                "total_tokens": finished.prompt_tokens + finished.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": finished.cached_tokens}}

    def body(self, choices: list, finished: Finished) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(finished)}


def failure(item: Failed) -> APIError:
    if item.kind == "timeout":
        return APIError(504, item.message, type="timeout_error", code="request_timeout")
    return APIError(500, item.message, type="server_error")


def stream(reply: Reply, request: Request, chunks, include_usage: bool) -> StreamingResponse:
    """Server-sent events: a chunk per piece of output, then usage if asked for, then [DONE]."""
    request.app.state.lm.engine.submit(reply.job)  # before the response starts: a full queue is still a 503

    async def events():
        try:
            while True:
                item = await reply.next(request)
                if isinstance(item, Failed):
                    yield sse(failure(item).body())
                    return
                for choice in chunks(item):
                    yield sse(reply.envelope([choice]))
                if isinstance(item, Finished):
                    break
            if include_usage:
                yield sse({**reply.envelope([]), "usage": reply.usage(item)})
            yield "data: [DONE]\n\n"
        finally:
            reply.job.cancel()  # the client went away mid-stream (or we are done: then a no-op)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def token_logprob(tokenizer, token_id: int, logprob: float) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


class ChatOutput:
    """Parsed chat output: deltas as tokens arrive, and the whole message at the end."""

    def __init__(self, parser: OutputParser, tokenizer, logprobs: bool):
        self.parser, self.tokenizer, self.want_logprobs = parser, tokenizer, logprobs
        self.reasoning, self.content, self.tool_calls, self.logprobs = "", "", [], []
        self.started = False

    def add(self, item: Token) -> list[dict]:
        """Deltas for one token (its text may complete none, one or several events)."""
        deltas = [self._delta(event) for event in self.parser.feed(item.text)]
        if self.want_logprobs:
            entry = token_logprob(self.tokenizer, item.token, item.logprob)
            entry["top_logprobs"] = [token_logprob(self.tokenizer, t, lp) for t, lp in item.top_logprobs]
            self.logprobs.append(entry)
        return deltas

    def chunks(self, item) -> list[dict]:
        """Stream choices for an engine item: the role first, then deltas, then the finish reason."""
        choices = []
        if not self.started:
            self.started = True
            choices.append({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        if isinstance(item, Token):
            deltas = self.add(item)
            logprobs = {"content": self.logprobs[-1:]} if self.want_logprobs else None
            if logprobs and not deltas:
                deltas = [{}]
            choices += [{"index": 0, "delta": d, "finish_reason": None, "logprobs": logprobs if i == 0 else None}
                        for i, d in enumerate(deltas)]
        else:
            choices += [{"index": 0, "delta": self._delta(e), "finish_reason": None} for e in self.parser.finish()]
            if item.reason != "cancelled":
                choices.append({"index": 0, "delta": {}, "finish_reason": self.finish_reason(item.reason)})
        return choices

    def _delta(self, event) -> dict:
        if event.kind == "reasoning":
            self.reasoning += event.text
            return {"reasoning_content": event.text}
        if event.kind == "tool_call":
            call = {"index": len(self.tool_calls), "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                    "function": {"name": event.call["name"], "arguments": json.dumps(event.call["arguments"])}}
            self.tool_calls.append(call)
            return {"tool_calls": [call]}
        # content, or a tool call that did not parse: its raw text is kept as content, never dropped
        self.content += event.text
        return {"content": event.text}

    def message(self) -> dict:
        for event in self.parser.finish():
            self._delta(event)
        message = {"role": "assistant", "content": self.content or (None if self.tool_calls else "")}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if self.tool_calls:
            message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in self.tool_calls]
        return message

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.tool_calls and reason == "stop" else reason


class CompletionOutput:
    """Plain text output (no chat parsing) with OpenAI's legacy logprobs layout."""

    def __init__(self, tokenizer, top_logprobs: Optional[int]):
        self.tokenizer, self.top = tokenizer, top_logprobs
        self.text, self.tokens, self.token_logprobs, self.top_logprobs, self.offsets = "", [], [], [], []

    def add(self, item: Token) -> dict:
        logprobs = None
        if self.top is not None:
            token = self.tokenizer.decode([item.token])
            top = {self.tokenizer.decode([t]): lp for t, lp in item.top_logprobs}
            logprobs = {"tokens": [token], "token_logprobs": [item.logprob], "top_logprobs": [top],
                        "text_offset": [len(self.text)]}
            self.tokens.append(token)
            self.token_logprobs.append(item.logprob)
            self.top_logprobs.append(top)
            self.offsets.append(len(self.text))
        self.text += item.text
        return {"index": 0, "text": item.text, "finish_reason": None, "logprobs": logprobs}

    def chunks(self, item) -> list[dict]:
        if isinstance(item, Token):
            return [self.add(item)]
        if item.reason == "cancelled":
            return []
        return [{"index": 0, "text": "", "finish_reason": item.reason, "logprobs": None}]

    def logprobs(self) -> Optional[dict]:
        if self.top is None:
            return None
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.offsets}
