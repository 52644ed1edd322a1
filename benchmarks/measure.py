"""Timed generation runs in `mlx_lm.benchmark` form, for either runtime, and the device's memory bandwidth.

Each runtime runs its own prefill-and-decode generator (ours: `mlx_gemma4.generate.generate_step`;
mlx-lm's: `mlx_lm.generate.generate_step`) greedily on token ids, so tokenizing and detokenizing stay
out of the numbers, as in llama-bench. Rates follow mlx-lm's `stream_generate`: prompt tok/s = prompt
length / time to the first token; generation tok/s = tokens / time from the first token to the last.
"""

import statistics
import time
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step as mlx_lm_generate_step

from mlx_gemma4.generate import generate_step


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def ours_tokens(model, prompt: mx.array, gen_tokens: int, prefill_step: int):
    return generate_step(model, prompt, model.make_cache(), greedy, prefill_step=prefill_step)


def mlx_lm_tokens(model, prompt: mx.array, gen_tokens: int, prefill_step: int):
    return mlx_lm_generate_step(prompt, model, max_tokens=gen_tokens, sampler=greedy, prefill_step_size=prefill_step)


RUNTIMES = {"ours": ours_tokens, "mlx-lm": mlx_lm_tokens}


@dataclass
class Run:
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float


def weight_bytes(model) -> int:
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def timed_run(runtime: str, model, prompt: mx.array, gen_tokens: int, prefill_step: int) -> Run:
    """One generation of `gen_tokens` (>= 2) tokens after `prompt`.

    Both models stay resident during a benchmark, so peak memory is reported as this runtime's own
    weights plus what the run allocated above the memory in use when it started: what the runtime
    would peak at alone.
    """
    mx.synchronize()
    baseline = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    tokens = RUNTIMES[runtime](model, prompt, gen_tokens, prefill_step)
    for n, _ in enumerate(tokens, start=1):
        if n == 1:
            first = time.perf_counter()
        if n == gen_tokens:
            break
    end = time.perf_counter()
    tokens.close()
    mx.synchronize()  # the step computed ahead must not spill into the next run
    peak = mx.get_peak_memory() - baseline + weight_bytes(model)
    return Run(prompt.size / (first - start), gen_tokens / (end - first), peak / 1e9)


def summary(samples: list) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def memory_bandwidth(nbytes: int, repeats: int = 5) -> dict:
    """GB/s of a full read (a sum) and of a copy (read + write counted) of an `nbytes` float32 array."""
    x = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(x)

    def seconds(fn) -> float:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    read = nbytes / seconds(lambda: x.sum()) / 1e9
    copy = 2 * nbytes / seconds(lambda: x * 2.0) / 1e9
    del x
    mx.clear_cache()
    return {"read": read, "copy": copy, "bytes": nbytes}
