"""The app-facing Python API: load a model with progress, chat or complete on a background worker,
cancel a running generation, count tokens, model info, unload.

    lm = mlx_gemma4.api.load(progress=lambda fraction, stage: print(f"{fraction:.0%} {stage}"))
    run = lm.chat([{"role": "user", "content": "Hi"}], max_tokens=64)
    for event in run:                  # chat.Event: reasoning / content / tool_call / tool_call_error
        print(event.text, end="")      # run.cancel() from any thread stops it at the next token
    lm.unload()

Generation runs on the engine's worker thread (mlx_gemma4.server.engine), the same one the HTTP
server uses, so several generations may run at once and each can be cancelled.
"""

import queue
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import BUNDLED_MODEL
from . import load as load_checkpoint
from .chat import Event, OutputParser, render_chat
from .generate import SamplingParams
from .model.fused import fuse_projections
from .server.engine import Engine, Failed, Finished, Job

Progress = Callable[[float, str], None]


def load(path_or_repo: str = str(BUNDLED_MODEL), progress: Optional[Progress] = None, name: Optional[str] = None,
         **engine_options) -> "LocalModel":
    """Load a model folder or hub id; `progress(fraction, stage)` is called as the weights arrive.

    Loading runs on the engine's worker thread (it owns every MLX array); `engine_options` reach
    `Engine` (max_active, max_queue, cached_sessions, prefill_step, kv_quant).
    """
    engine = Engine(lambda: load_weights(path_or_repo, progress), **engine_options)
    return LocalModel(engine, name or Path(str(path_or_repo)).name, str(path_or_repo))


def load_weights(path_or_repo: str, progress: Optional[Progress] = None) -> tuple:
    """(model, tokenizer) with the weights evaluated one tensor at a time, reporting progress."""
    report = progress or (lambda fraction, stage: None)
    report(0.0, "reading the checkpoint")
    model, tokenizer = load_checkpoint(path_or_repo, lazy=True)
    parameters = [array for _, array in tree_flatten(model.parameters())]
    total, done, reported = sum(a.nbytes for a in parameters) or 1, 0, 0.0
    for array in parameters:
        mx.eval(array)
        done += array.nbytes
        if done / total - reported >= 0.01 or (done == total and reported < 1):  # about a hundred calls
            reported = done / total
            report(reported, "loading weights")
    del parameters  # the model alone holds its arrays: fusing then frees those it replaces
    fuse_projections(model)
    return model, tokenizer


class Generation:
    """A running generation: iterate it for events; `cancel()` stops it; `finished` says how it ended."""

    def __init__(self, engine: Engine, job_options: dict, parser: Optional[OutputParser]):
        self._events: queue.Queue = queue.Queue()
        self._parser = parser
        self.finished: Optional[Finished] = None
        self.job = Job(emit=self._events.put, **job_options)
        engine.submit(self.job)

    def cancel(self):
        self.job.cancel()

    def __iter__(self) -> Iterator[Event]:
        while self.finished is None:
            item = self._events.get()
            if isinstance(item, Failed):
                raise RuntimeError(f"generation failed ({item.kind}): {item.message}")
            if isinstance(item, Finished):
                self.finished = item
                yield from self._parser.finish() if self._parser else ()
            elif self._parser:
                yield from self._parser.feed(item.text)
            elif item.text:
                yield Event("content", item.text)

    def text(self) -> str:
        """Run to the end; the content text (reasoning and tool calls left out)."""
        return "".join(e.text for e in self if e.kind == "content")


class LocalModel:
    def __init__(self, engine: Engine, name: str, path: str):
        self.engine, self.name, self.path = engine, name, path
        self.model, self.tokenizer = engine.model, engine.tokenizer

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def render(self, messages: list[dict], tools: Optional[list] = None, thinking: bool = False) -> str:
        self._check_loaded()
        return render_chat(self.tokenizer, messages, tools=tools or None, enable_thinking=thinking)

    def encode_chat(self, messages: list[dict], tools: Optional[list] = None, thinking: bool = False) -> list[int]:
        return self.tokenizer.encode(self.render(messages, tools, thinking), add_special_tokens=False)

    def encode_text(self, text: str) -> list[int]:
        self._check_loaded()
        return self.tokenizer.encode(text, add_special_tokens=True)

    def count_tokens(self, text: Optional[str] = None, messages: Optional[list] = None,
                     tools: Optional[list] = None, thinking: bool = False) -> int:
        """Tokens of raw `text` (with <bos>), or of `messages` rendered as a chat prompt."""
        if (text is None) == (messages is None):
            raise ValueError("count_tokens takes either text or messages")
        return len(self.encode_text(text) if messages is None else self.encode_chat(messages, tools, thinking))

    def chat(self, messages: list[dict], tools: Optional[list] = None, thinking: bool = False,
             max_tokens: int = 256, sampling: Optional[SamplingParams] = None, stop: Sequence[str] = (),
             timeout: Optional[float] = None) -> Generation:
        prompt = self.render(messages, tools, thinking)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        return Generation(self.engine, self._job(ids, max_tokens, sampling, stop, timeout), OutputParser.for_prompt(prompt))

    def complete(self, text: str, max_tokens: int = 256, sampling: Optional[SamplingParams] = None,
                 stop: Sequence[str] = (), timeout: Optional[float] = None) -> Generation:
        return Generation(self.engine, self._job(self.encode_text(text), max_tokens, sampling, stop, timeout), None)

    def _job(self, prompt, max_tokens, sampling, stop, timeout) -> dict:
        if len(prompt) >= self.context_length:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.context_length}")
        return dict(prompt=prompt, max_tokens=min(max_tokens, self.context_length - len(prompt)),
                    sampling=sampling or SamplingParams(), stop=tuple(stop), timeout=timeout)

    def info(self) -> dict:
        config = self.model.config
        parameters = sum(a.size for _, a in tree_flatten(self.model.parameters()))
        return {
            "name": self.name,
            "path": self.path,
            "model_type": type(self.model).__module__.rsplit(".", 1)[-1],
            "parameters": parameters,
            "layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size,
            "context_length": self.context_length,
            "sliding_window": config.sliding_window,
            "dtype": str(self.model.model.embed_tokens.weight.dtype).removeprefix("mlx.core."),
            "quantized": any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in self.model.named_modules()),
            "vision": bool(getattr(self.model, "has_vision", False)),
            "audio": bool(getattr(self.model, "has_audio", False)),
            "eos_token_ids": sorted(self.tokenizer.eos_token_ids),
        }

    def _check_loaded(self):
        if self.model is None:
            raise RuntimeError(f"{self.name} has been unloaded; load it again")

    def unload(self):
        """Stop the worker (cancelling what runs); it drops the weights and caches and returns MLX's memory."""
        self.model = self.tokenizer = None
        self.engine.stop()
