"""How close a converted checkpoint stays to its source: KL divergence and top-1 agreement.

Both models read the same prompts; at every position we compare the next-token distributions:
mean KL(source || converted) in nats, the share of positions whose most likely token agrees, and
(for prompts made from text) each model's perplexity on the text. By default both compute in float32
(stored values cast exactly; quantized weights stay packed), so the numbers measure what the stored
weights lost rather than bf16 rounding in the arithmetic; `--compute-dtype bfloat16` halves the memory
for large models. The prompts are the fixed texts below through the source's tokenizer, or, without a
tokenizer, seeded random token ids (enough to see that a tiny random model survived conversion,
meaningless for quality).

    python -m mlx_gemma4.convert.report SOURCE CONVERTED [--compute-dtype bfloat16]
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from ..config import TextConfig
from ..loading import LoadError, load_model, read_config, resolve_path

# Written for this report, in several registers; not in any training set.
SAMPLE_TEXTS = (
    "The function returns a list of the files found in the given folder, sorted by name. When the "
    "recursive argument is true, the folders below it are searched as well, and each path is given "
    "relative to the starting point. A missing folder raises an error rather than giving an empty list.",
    "To build the project, install the compiler and run the configure script once. Then type make in "
    "the top folder. The first build takes a few minutes; later builds only compile the files that "
    "changed. If the build fails, read the first error message, not the last one.",
    "The cache keeps the most recent results in memory. Each entry records its key, its value and the "
    "time it was last used. When the cache is full, the entry that was used least recently is removed "
    "to make room. Reading a value counts as a use, and so does writing one.",
    "She opened the window and looked at the street below. The rain had stopped an hour ago, but the "
    "road was still wet and the lamps made long yellow lines on it. Somewhere a dog was barking, and a "
    "car went past slowly, as if the driver was looking for a house number.",
    "Return the number of seconds since the start of the process as a floating point number. The value "
    "is not affected by changes to the system clock, so it is suitable for measuring how long an "
    "operation takes. Only the difference between two calls is meaningful.",
    "A queue holds items in the order they were added. The put method adds an item at the end, and the "
    "get method removes the item at the front and returns it. If the queue is empty, get waits until an "
    "item is available, unless the block argument is false, in which case it raises an exception.",
    "Q: Why does my program print nothing? A: The output is buffered. Call flush on the stream after "
    "writing, or open the file with line buffering, and the text will appear as soon as each line ends.",
    "Parse the string as a date in the form year, month, day, separated by dashes. Leading and trailing "
    "spaces are ignored. A value outside the valid range for its field, such as a thirteenth month, "
    "raises a ValueError that names the field.",
)
RANDOM_PROMPTS, RANDOM_LENGTH = 4, 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class Quality:
    kl: float  # mean KL(source || converted) per position, nats
    top1: float  # share of positions whose argmax agrees
    positions: int
    ppl_source: Optional[float]  # perplexity on the sample text (None for random prompts)
    ppl_converted: Optional[float]


def sample_prompts(folder: Path, vocab_size: int) -> tuple[list[np.ndarray], bool]:
    """(token id arrays, whether they come from text)."""
    if any((folder / name).exists() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        return [np.array(tokenizer(text).input_ids) for text in SAMPLE_TEXTS], True
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, RANDOM_LENGTH) for _ in range(RANDOM_PROMPTS)], False


def compare(reference: Callable, candidate: Callable, prompts: list[np.ndarray], from_text: bool) -> Quality:
    """Both are callables ids [1, L] -> logits [1, L, vocab] (ours, or mlx-lm's models)."""
    kl, agree, nll_ref, nll_cand, positions = 0.0, 0, 0.0, 0.0, 0
    for ids in prompts:
        x = mx.array(ids[None], dtype=mx.int32)
        ref = _log_probs(reference(x))
        cand = _log_probs(candidate(x))
        kl += (np.exp(ref) * (ref - cand)).sum()
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        targets = ids[1:]
        nll_ref -= ref[np.arange(len(targets)), targets].sum()
        nll_cand -= cand[np.arange(len(targets)), targets].sum()
        positions += len(ids)
    predicted = sum(len(ids) - 1 for ids in prompts)
    ppl = (lambda nll: float(np.exp(nll / predicted))) if from_text else (lambda nll: None)
    return Quality(float(kl / positions), agree / positions, positions, ppl(nll_ref), ppl(nll_cand))


def _log_probs(logits: mx.array) -> np.ndarray:
    logits = logits[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64)


def quality(source: Path, converted: Path, compute_dtype: str = "float32") -> Quality:
    source = resolve_path(str(source))
    vocab_size = TextConfig.from_dict(read_config(source)).vocab_size
    prompts, from_text = sample_prompts(source, vocab_size)
    models = [load_model(path) for path in (source, converted)]
    for model in models:
        model.set_dtype(getattr(mx, compute_dtype))  # floating parameters only; packed weights untouched
    return compare(*models, prompts, from_text)


def format_quality(q: Quality) -> str:
    line = f"KL {q.kl:.3e} nats/token, top-1 agreement {q.top1:.2%} over {q.positions} positions"
    if q.ppl_source is not None:
        line += f"; perplexity {q.ppl_converted:.3f} (source {q.ppl_source:.3f})"
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mlx_gemma4.convert.report", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="the checkpoint that was converted (folder or hub id)")
    parser.add_argument("converted", help="the converted folder")
    parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    try:
        print(format_quality(quality(args.source, args.converted, args.compute_dtype)))
    except LoadError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
