"""One model worker thread and the scheduler that keeps every client progressing.

MLX work happens only on the worker thread, which also loads the model (MLX arrays belong to the
thread that created them) and frees it on `stop`. Requests wait in a bounded queue (`Overloaded` when it
is full) and up to `max_active` run at once, interleaved: each turn of the loop gives every active
request one step, a prefill chunk or one generated token, so a long prompt never stalls the others.
Each request runs batch 1 on its own prompt cache, so its output is exactly what it would be alone.
A request that is cancelled (its client went away) or past its deadline leaves at its next turn.
A prompt with images or audio is prefilled in one turn (its towers, then chunks that keep every
media span whole: model.run_prompt), on a fresh cache that is not kept afterwards.
"""

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from ..generate import SamplingParams, stream_generate
from ..model.gemma4 import Media
from .sessions import SessionPool


class Overloaded(RuntimeError):
    """The waiting queue is full: try again later."""


@dataclass
class Token:
    text: str  # new visible text (held back while it could still become a stop string)
    token: int
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None  # [(token id, logprob)], most likely first


@dataclass
class Finished:
    reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    kind: str  # "timeout" or "internal"
    message: str


@dataclass
class Job:
    prompt: list[int]
    emit: Callable[[object], None]  # called on the worker thread with Token, then Finished or Failed
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple = ()
    top_logprobs: Optional[int] = None  # None: no log-probabilities; 0: only the chosen token's
    media: Optional[Media] = None  # the prompt's images and audio (processing.prepare_inputs)
    timeout: Optional[float] = None  # seconds from submission
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.deadline = time.monotonic() + self.timeout if self.timeout else float("inf")

    def cancel(self):
        self.cancelled.set()


class _Run:
    """A job being served: its prompt cache, the prompt part still to prefill, then its token stream."""

    def __init__(self, job: Job, sessions: SessionPool):
        self.job = job
        self.stream = None
        self.generated = 0
        if job.media:
            # Placeholder ids do not say which image or clip they stand for, so a media prompt must
            # neither reuse a cached conversation nor leave one behind: stream_generate gives it a
            # fresh cache of its own, dropped when the run ends (self.cache stays None: no checkin).
            self.cache, self.cached = None, 0
            return
        self.cache = sessions.checkout(job.prompt)
        remaining, _ = self.cache.prepare(job.prompt)
        self.cached = len(job.prompt) - len(remaining)
        # prepare() records the whole prompt; the caches hold only the kept prefix until it is fed.
        del self.cache.tokens[self.cached :]


class Engine:
    def __init__(self, load: Callable[[], tuple], max_active: int = 8, max_queue: int = 64, cached_sessions: int = 4,
                 prefill_step: int = 256, kv_quant=None):
        """`load()` returns (model, tokenizer); it runs on the worker thread, and its errors raise here.
        `kv_quant` (quantized_cache.KVQuantConfig) quantizes every request's KV cache."""
        self.max_active, self.max_queue, self.prefill_step = max_active, max_queue, prefill_step
        self._cached_sessions, self._kv_quant = cached_sessions, kv_quant
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[_Run] = []
        self._wake = threading.Condition()
        self._stopped = False
        self._clear_sessions = threading.Event()
        self.counts = {"completed": 0, "cancelled": 0, "timed_out": 0, "failed": 0}
        self._loaded = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, args=(load,), name="mlx-gemma4-engine", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    # ---- any thread ----

    def submit(self, job: Job):
        with self._wake:
            if self._stopped:
                raise RuntimeError("the engine has been stopped")
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(job)
            self._wake.notify()

    def stats(self) -> dict:
        return {"active": len(self._active), "waiting": len(self._waiting), "cached_sessions": len(self.sessions),
                **self.counts}

    def clear_sessions(self):
        """Drop the cached conversations (done by the worker, between steps)."""
        with self._wake:
            self._clear_sessions.set()
            self._wake.notify()

    def stop(self):
        """Cancel what runs and waits, free the model and caches (on the worker), end the thread."""
        with self._wake:
            self._stopped = True
            for job in self._waiting:
                job.cancel()
            self._wake.notify()
        self._thread.join()

    # ---- worker thread ----

    def _work(self, load: Callable[[], tuple]):
        try:
            self.model, self.tokenizer = load()
            self.sessions = SessionPool(self.model, self._cached_sessions, self._kv_quant)
        except BaseException as error:  # noqa: BLE001 - re-raised by the constructor
            self._load_error = error
            return
        finally:
            self._loaded.set()
        self._loop()
        self.sessions.clear()
        self.model = self.tokenizer = None
        mx.clear_cache()

    def _loop(self):
        while True:
            with self._wake:
                while not (self._waiting or self._active or self._stopped or self._clear_sessions.is_set()):
                    self._wake.wait()
                if self._stopped and not self._active and not self._waiting:
                    return
                admitted = []
                while self._waiting and len(self._active) + len(admitted) < self.max_active:
                    admitted.append(self._waiting.popleft())
            if self._clear_sessions.is_set():
                self.sessions.clear()
                self._clear_sessions.clear()
            for job in admitted:
                if not self._leaves(job):
                    self._guarded(job, lambda: self._active.append(_Run(job, self.sessions)))
            for run in list(self._active):
                if self._leaves(run.job, run) or self._guarded(run.job, lambda: self._advance(run), run):
                    self._retire(run)

    def _leaves(self, job: Job, run: Optional[_Run] = None) -> bool:
        """Emit the end of a cancelled or timed-out job; True if it must leave."""
        if job.cancelled.is_set() or self._stopped:
            self.counts["cancelled"] += 1
            job.emit(Finished("cancelled", len(job.prompt), run.cached if run else 0, run.generated if run else 0))
            return True
        if time.monotonic() > job.deadline:
            self.counts["timed_out"] += 1
            job.emit(Failed("timeout", f"the request did not finish within {job.timeout:g} s"))
            return True
        return False

    def _guarded(self, job: Job, step: Callable, run: Optional[_Run] = None) -> bool:
        """Run `step`; an exception fails this job only (its cache is dropped), never the worker."""
        try:
            return step()
        except Exception as error:  # noqa: BLE001 - reported to the client as a 500
            self.counts["failed"] += 1
            job.emit(Failed("internal", f"{type(error).__name__}: {error}"))
            if run is not None:
                run.cache = None
                self._retire(run)
            return False

    def _retire(self, run: _Run):
        if run in self._active:
            self._active.remove(run)
        if run.stream is not None:
            run.stream.close()
        if run.cache is not None:
            self.sessions.checkin(run.cache)
            run.cache = None

    def _advance(self, run: _Run) -> bool:
        """One step of `run`: a prefill chunk, or one token. True when the run is done."""
        job, cache = run.job, run.cache
        # Prefill all but the last token here; stream_generate does the rest (and all of a media prompt).
        if cache is not None and len(cache.tokens) < len(job.prompt) - 1:
            fed = len(cache.tokens)
            chunk = job.prompt[fed : min(fed + self.prefill_step, len(job.prompt) - 1)]
            self.model(mx.array(chunk, dtype=mx.int32)[None], cache=cache.cache, logits_to_keep=1)
            mx.eval([c.keys for c in cache.cache])
            cache.tokens.extend(chunk)
            return False
        if run.stream is None:
            run.stream = stream_generate(self.model, self.tokenizer, job.prompt, max_tokens=job.max_tokens,
                                         sampling=job.sampling, stop=job.stop, prompt_cache=cache,
                                         return_logprobs=job.top_logprobs is not None, media=job.media,
                                         kv_quant=self._kv_quant)  # the media prompt's fresh cache
        elif job.sampling.seed is not None:
            # Other requests draw from the global generator in between: reseed from (seed, step).
            mx.random.seed((job.sampling.seed * 1_000_003 + run.generated) % 2**32)
        response = next(run.stream)
        run.generated += 1
        job.emit(self._token(response, job.top_logprobs))
        if response.finish_reason:
            self.counts["completed"] += 1
            job.emit(Finished(response.finish_reason, len(job.prompt), run.cached, run.generated))
            return True
        return False

    @staticmethod
    def _token(response, top_n: Optional[int]) -> Token:
        if top_n is None:
            return Token(response.text, response.token)
        logprobs = response.logprobs
        top = []
        if top_n:
            ids = mx.argpartition(-logprobs, top_n - 1)[:top_n]
            values = logprobs[ids]
            order = mx.argsort(-values)
            top = list(zip(ids[order].tolist(), values[order].tolist()))
        return Token(response.text, response.token, logprobs[response.token].item(), top)
