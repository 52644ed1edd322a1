"""Generation: chunked prefill, the decode loop, sampling, stop conditions, streaming with stats.

`stream_generate` yields a `GenerationResponse` per token (text pieces held back while they could
still become a stop string); `generate` returns the whole text. The command line lives in cli.py (`python -m mlx_gemma4.generate`).
"""

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .prompt_cache import PromptCache
from .quantized_cache import KVQuantConfig

DEFAULT_PREFILL_STEP = 512


@dataclass
class GenerationResponse:
    text: str  # new text since the previous response
    token: int
    logprobs: Optional[mx.array]  # log-probabilities over the vocabulary, when asked for
    finish_reason: Optional[str]  # "stop", "length", or None while generating
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB


@dataclass
class SamplingParams:
    """Sampling settings; None means the checkpoint's generation_config.json default."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    seed: Optional[int] = None

    def resolved(self, defaults: dict) -> "SamplingParams":
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                             ("min_p", "min_p"), ("repetition_penalty", "repetition_penalty")):
            if values[ours] is None and theirs in defaults:
                values[ours] = defaults[theirs]
        if defaults.get("do_sample") is False and self.temperature is None:
            values["temperature"] = 0.0
        return SamplingParams(**values)

    def sampler(self) -> Callable:
        return make_sampler(
            temp=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 0.0,
            min_p=self.min_p or 0.0,
            top_k=self.top_k or 0,
        )

    def processors(self) -> list:
        return make_logits_processors(
            logit_bias=self.logit_bias,
            repetition_penalty=self.repetition_penalty if self.repetition_penalty != 1.0 else None,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )


def prefill(model, tokens: mx.array, cache: list, step: int = DEFAULT_PREFILL_STEP, media=None) -> mx.array:
    """Run the prompt through the model in chunks; logits of the last position, [1, vocab].

    With `media` (processing.prepare_inputs) the multimodal model embeds it and keeps each media span
    inside one chunk."""
    if media:
        return model.run_prompt(np.array(tokens), media, cache, step)
    for start in range(0, tokens.size - 1, step):
        chunk = tokens[start : min(start + step, tokens.size - 1)]
        model(chunk[None], cache=cache, logits_to_keep=1)
        mx.eval([c.keys for c in cache])
    return model(tokens[-1:][None], cache=cache)[:, -1, :]


def generate_step(
    model,
    prompt: mx.array,
    cache: list,
    sampler: Callable,
    processors: Sequence[Callable] = (),
    prefill_step: int = DEFAULT_PREFILL_STEP,
    media=None,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (token, logprobs) forever; the next step is computed while the caller handles this one."""
    history = prompt

    def sample(logits):
        nonlocal history
        for processor in processors:
            logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        history = mx.concatenate([history, token]) if processors else history
        return token, logprobs

    token, logprobs = sample(prefill(model, prompt, cache, prefill_step, media).astype(mx.float32))
    mx.async_eval(token, logprobs)
    while True:
        next_token, next_logprobs = sample(model(token[None], cache=cache)[:, -1, :].astype(mx.float32))
        mx.async_eval(next_token, next_logprobs)
        yield token.item(), logprobs[0]
        token, logprobs = next_token, next_logprobs


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    max_tokens: int = 256,
    sampling: Optional[SamplingParams] = None,
    stop: Sequence[str] = (),
    prompt_cache: Optional[PromptCache] = None,
    return_logprobs: bool = False,
    kv_quant: Optional[KVQuantConfig] = None,  # quantizes the KV cache of a new prompt cache
    prefill_step: int = DEFAULT_PREFILL_STEP,
    images: Sequence = (),
    audio: Sequence = (),
    videos: Sequence = (),
    image_tokens: Optional[int] = None,
    media=None,
) -> Iterator[GenerationResponse]:
    """Stream a completion of `prompt` (text, token ids, or with media chat messages) until EOS, a stop
    string or max_tokens.

    `images`, `audio`, `videos`: paths, URLs or bytes, placed at the prompt's `<|image|>`... markers
    (first when it has none); `image_tokens`: the soft-token budget per image (70/140/280/560/1120).
    Or pass token ids with their `media` from processing.prepare_inputs.
    """
    if images or audio or videos or isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        from .processing import prepare_inputs

        prompt, media = prepare_inputs(model, tokenizer, prompt, images, audio, videos, image_tokens)
    if media:  # placeholder ids do not identify the media: a prompt with media never reuses a cache
        prompt_cache = PromptCache(model, kv_quant)
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt, add_special_tokens=not prompt.startswith(tokenizer.bos_token or "\0"))
    if not len(prompt):
        raise ValueError("the prompt is empty")
    vocab = model.config.vocab_size
    if max(prompt) >= vocab or min(prompt) < 0:
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    sampling = (sampling or SamplingParams()).resolved(getattr(model, "generation_defaults", {}))
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    prompt_cache = prompt_cache or PromptCache(model, kv_quant)
    remaining, cache = prompt_cache.prepare(list(prompt))
    eos = set(tokenizer.eos_token_ids)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    text, sent = "", 0
    start = time.perf_counter()
    steps = generate_step(model, mx.array(remaining, dtype=mx.int32), cache, sampling.sampler(),
                          sampling.processors(), prefill_step, media)
    prompt_time = None
    for n, (token, logprobs) in enumerate(steps, start=1):
        if prompt_time is None:
            prompt_time = time.perf_counter() - start
            start = time.perf_counter()
        finish = None
        prompt_cache.append(token)  # the caches hold every yielded token, EOS included
        if token in eos:
            finish = "stop"
        else:
            detokenizer.add_token(token)
            text += detokenizer.last_segment
        if finish is None:
            hit = min((i for i in (text.find(s, max(0, sent - len(s))) for s in stop) if i >= 0), default=-1)
            if hit >= 0:
                text, finish = text[:hit], "stop"
            elif n >= max_tokens:
                finish = "length"
        if finish == "length" or (finish == "stop" and token in eos):
            detokenizer.finalize()
            text += detokenizer.last_segment
        visible = len(text) if finish else len(text) - held_back(text, stop)
        elapsed = time.perf_counter() - start
        yield GenerationResponse(
            text=text[sent:visible],
            token=token,
            logprobs=logprobs if return_logprobs else None,
            finish_reason=finish,
            prompt_tokens=len(remaining),
            prompt_tps=len(remaining) / max(prompt_time, 1e-9),
            generation_tokens=n,
            generation_tps=n / max(elapsed, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
        )
        sent = max(sent, visible)
        if finish:
            break


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(f"\nprompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s; "
              f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s; "
              f"peak memory {last.peak_memory:.3f} GB")
    return text


def main():
    from .cli import generate_main

    generate_main()


if __name__ == "__main__":
    main()
