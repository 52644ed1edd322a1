"""Train the bundled toy Gemma 4 model (mlx_gemma4/bundled/gemma4-tiny) from scratch, offline, on a CPU.

What it does, start to finish:
1. Collects English text that every Python installation carries: the docstrings of the public standard
   library (modules, classes, functions, methods) and the reference-manual topics in `pydoc_data`.
   Documents are deduplicated; a fixed 1 in 20 (by CRC32 of the text) is held out for evaluation.
   A quarter of the named training documents are rendered as Gemma 4 chat turns
   ("What is `json.dumps`?" -> its docstring), so the model also learns to answer and to close a turn.
2. Trains a byte-level BPE tokenizer (4096 entries) whose first ids are Gemma 4's special tokens.
3. Trains a tiny Gemma 4 text decoder with transformers (per-layer embeddings, KV sharing, sliding and
   full attention with their own head sizes, double-wide MLP, logit soft-capping), AdamW, fixed seed.
4. Measures held-out perplexity of the saved (bfloat16) weights and of an add-one unigram baseline.
5. Writes the Hugging Face folder: config, safetensors, generation config, tokenizer files, README, EVAL.

Run from the repository root (about 20 minutes on one idle CPU core; 30 when the other core is busy):

    python scripts/train_tiny.py

Refresh only the tokenizer metadata (e.g. after mlx_gemma4/chat_template.jinja changed), no retraining:

    python scripts/train_tiny.py --package-only
"""

import argparse
import contextlib
import datetime
import importlib
import inspect
import io
import json
import math
import os
import pkgutil
import shutil
import sys
import time
import warnings
import zlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, Gemma4ForCausalLM, Gemma4TextConfig, GenerationConfig

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "mlx_gemma4" / "bundled" / "gemma4-tiny"
CHAT_TEMPLATE = REPO / "mlx_gemma4" / "chat_template.jinja"

# Gemma 4's special tokens; their order fixes their ids (<pad> 0, <eos> 1, <bos> 2, ...).
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
    "<|tool_response>", "<tool_response|>", '<|"|>', "<|think|>",
    "<|image>", "<image|>", "<|audio>", "<audio|>", "<|image|>", "<|audio|>", "<|video|>",
]  # fmt: skip
# The named tokens Gemma 4's tokenizer_config.json carries; transformers exposes each as an attribute.
NAMED_TOKENS = {
    "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>", "eoc_token": "<channel|>",
    "think_token": "<|think|>", "escape_token": '<|"|>',
    "stc_token": "<|tool_call>", "etc_token": "<tool_call|>", "std_token": "<|tool>", "etd_token": "<tool|>",
    "str_token": "<|tool_response>", "etr_token": "<tool_response|>",
    "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
    "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>",
}  # fmt: skip
# Generation stops at end of text, end of turn, or when the model hands over to a tool.
STOP_TOKENS = ["<eos>", "<turn|>", "<|tool_response>"]
# One user question and the model's answer, as Gemma 4 lays out a conversation (after <bos>).
CHAT_TURNS = "<|turn>user\n{question}<turn|>\n<|turn>model\n{answer}<turn|>\n"

# Stdlib modules whose import has side effects (a browser, a GUI, printing) or that are test suites.
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests", "lib2to3", "ensurepip", "__main__"}  # fmt: skip

VOCAB_SIZE = 4096
GLOBAL_HEAD_DIM = 64  # head size of the full-attention layers
CONTEXT = 256
BATCH = 8
SEED = 0


def stdlib_modules():
    """Public stdlib modules and their public submodules, imported quietly, in sorted order."""
    names = [n for n in sorted(sys.stdlib_module_names) if not n.startswith("_") and n not in SKIP_MODULES]
    modules = []
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in names:
            with contextlib.suppress(Exception):
                module = importlib.import_module(name)
                modules.append(module)
                for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
                    parts = info.name.split(".")
                    if not any(p.startswith("_") or p in SKIP_MODULES for p in parts):
                        with contextlib.suppress(Exception):
                            modules.append(importlib.import_module(info.name))
    return modules


def collect_documents() -> dict[str, str]:
    """Map each distinct English text to the dotted name it documents ("" for manual topics)."""
    docs = {}

    def add(name, obj):
        text = (inspect.getdoc(obj) or "").strip()
        if len(text) >= 40:  # shorter ones are mostly "Return self+value." boilerplate
            docs.setdefault(text, name)

    for module in stdlib_modules():
        add(module.__name__, module)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isroutine(obj):
                add(f"{module.__name__}.{attr}", obj)
            if inspect.isclass(obj):
                for member, value in sorted(vars(obj).items()):
                    if not member.startswith("_") and (inspect.isroutine(value) or isinstance(value, property)):
                        add(f"{module.__name__}.{attr}.{member}", value)

    import pydoc_data.topics

    for topic in sorted(pydoc_data.topics.topics):
        docs.setdefault(pydoc_data.topics.topics[topic].strip(), "")
    return docs


def split_documents(docs: dict[str, str]):
    """Training texts (a quarter of named ones as chat turns) and held-out plain texts."""
    train, heldout = [], []
    for text, name in docs.items():
        crc = zlib.crc32(text.encode())
        if crc % 20 == 0:
            heldout.append(text)
        elif name and crc % 4 == 1:
            train.append(CHAT_TURNS.format(question=f"What is `{name}`?", answer=text))
        else:
            train.append(text)
    return train, heldout


def train_tokenizer(texts) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    # A raw prompt starts with <bos> like the training documents; chat templates write their own <bos>
    # and transformers renders them with add_special_tokens=False.
    bos = SPECIAL_TOKENS.index("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    return tokenizer


def write_json(path: Path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_tokenizer_metadata(folder: Path):
    """tokenizer_config.json and special_tokens_map.json, with the chat template when the package has one."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # a plain tokenizers backend: GemmaTokenizer assumes SentencePiece
        **NAMED_TOKENS,
        "extra_special_tokens": ["<|video|>"],
        "padding_side": "left",
        "model_max_length": 8192,
    }
    if CHAT_TEMPLATE.exists():
        config["chat_template"] = CHAT_TEMPLATE.read_text()
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", {k: v for k, v in NAMED_TOKENS.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")})
    print("chat template:", "included" if CHAT_TEMPLATE.exists() else f"absent ({CHAT_TEMPLATE} does not exist)")


def check_chat_template(folder: Path):
    """Warn when the package's template lays out a turn differently from the chat data the model saw."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template is None:
        return
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    expected = "<bos>" + CHAT_TURNS.format(question="Q", answer="A")
    if rendered != expected:
        print(f"warning: chat template renders {rendered!r}, the training data used {expected!r}")


def model_config(tokenizer: Tokenizer) -> Gemma4TextConfig:
    """E2B in miniature: PLE, the last 2 of 6 layers reuse KV, 2:1 sliding:full, double-wide shared MLPs."""
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    return Gemma4TextConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        global_head_dim=GLOBAL_HEAD_DIM,
        sliding_window=64,
        num_kv_shared_layers=2,
        hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=tokenizer.get_vocab_size(),
        use_double_wide_mlp=True,
        final_logit_softcapping=30.0,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.token_to_id("<pad>"),
        bos_token_id=tokenizer.token_to_id("<bos>"),
        eos_token_id=tokenizer.token_to_id("<eos>"),
    )


def token_stream(tokenizer: Tokenizer, texts) -> torch.Tensor:
    """All texts back to back, each as <bos> text <eos>."""
    eos = tokenizer.token_to_id("<eos>")
    ids = []
    for encoding in tokenizer.encode_batch(texts):  # the post-processor adds <bos>
        ids += encoding.ids + [eos]
    return torch.tensor(ids)


def windows(stream: torch.Tensor) -> torch.Tensor:
    """Non-overlapping CONTEXT-long windows; the first token of each is context only."""
    count = len(stream) // CONTEXT
    return stream[: count * CONTEXT].view(count, CONTEXT)


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, limit: int | None = None) -> float:
    model.eval()
    batches = windows(stream)[:limit].split(16)
    nll = sum(model(input_ids=b, labels=b).loss.item() * b[:, 1:].numel() for b in batches)
    model.train()
    return math.exp(nll / sum(b[:, 1:].numel() for b in batches))


def unigram_perplexity(train: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Add-one unigram estimated on the training stream, scored on the same targets as the model."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    log_probs = (counts / counts.sum()).log()
    targets = windows(heldout)[:, 1:].reshape(-1)
    return math.exp(-log_probs[targets].mean().item())


def train(model, stream: torch.Tensor, heldout: torch.Tensor, steps: int, lr: float):
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = steps // 20

    def schedule(step):  # linear warm-up, cosine decay to a tenth
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start, running = time.time(), []
    for step in range(1, steps + 1):
        offsets = torch.randint(0, len(stream) - CONTEXT, (BATCH,), generator=generator)
        batch = torch.stack([stream[o : o + CONTEXT] for o in offsets])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if step % 50 == 0 or step == steps:
            line = f"step {step}/{steps}  loss {sum(running) / len(running):.3f}  {time.time() - start:.0f}s"
            if step % 250 == 0 or step == steps:
                line += f"  held-out ppl (first 32 windows) {perplexity(model, heldout, 32):.1f}"
            print(line, flush=True)
            running = []
    return time.time() - start


def sample_continuations(model, folder: Path, prompt: str) -> tuple[str, str]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(prompt, return_tensors="pt")
    greedy = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    torch.manual_seed(SEED)
    sampled = model.generate(**inputs, max_new_tokens=40)
    return tuple(tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True) for out in (greedy, sampled))


def write_readme(folder: Path, params: int, steps: int):
    size_mb = (folder / "model.safetensors").stat().st_size / 1e6
    (folder / "README.md").write_text(f"""# gemma4-tiny

A {params / 1e6:.2f}M-parameter Gemma 4 text model (`Gemma4ForCausalLM`, `model_type` `gemma4_text`) trained
from scratch on Python standard-library docstrings. It is a toy: it writes English-looking API prose and
knows nothing. It exists so that mlx-gemma4's tests and demos have *trained* weights (quantization error,
sampling, stop tokens and chat turns behave as with a real model) without a download.

- Architecture: 6 layers (sliding, sliding, full) x 2, hidden 128, 4 query heads, 1 KV head, head_dim 32 on
  sliding layers (window 64) and 64 on full layers, per-layer embeddings of width 16, the last 2 layers
  reuse earlier layers' KV and have double-wide MLPs (1024), final logit soft-cap 30, tied embeddings.
- Weights: bfloat16, `model.safetensors` {size_mb:.1f} MB.
- Tokenizer: byte-level BPE, {VOCAB_SIZE} entries; ids 0-23 are Gemma 4's special tokens (`<pad>` 0,
  `<eos>` 1, `<bos>` 2, `<|turn>` 5, `<turn|>` 6, ...). A plain prompt gets `<bos>` prepended.
- Training: {steps} AdamW steps of {BATCH} x {CONTEXT} tokens on one CPU thread; a quarter of the named
  documents were shown as chat turns (`<|turn>user` "What is `name`?" / `<|turn>model` docstring).
  Held-out perplexity against a unigram baseline is in `EVAL.md`.
- Rebuild: `python scripts/train_tiny.py` from the repository root.
""")


def write_eval(folder: Path, facts: dict):
    (folder / "EVAL.md").write_text(f"""# gemma4-tiny evaluation

| | perplexity per token |
|---|---|
| this model (bfloat16 weights, computed in float32) | {facts["model_ppl"]:.2f} |
| unigram baseline (add-one, fitted on the training split) | {facts["unigram_ppl"]:.2f} |

- Held-out data: {facts["heldout_docs"]} documents ({facts["heldout_tokens"]} tokens), the 1 in 20 whose
  CRC32 is divisible by 20, scored in non-overlapping windows of {CONTEXT} tokens (first token of each
  window is context only; the same targets for both rows).
- Training data: {facts["train_docs"]} documents ({facts["train_tokens"]} tokens): docstrings of the public
  Python {sys.version.split()[0]} standard library and the `pydoc_data` reference topics, a quarter of the
  named ones as chat turns.
- Training: {facts["steps"]} steps, batch {BATCH} x {CONTEXT} tokens, AdamW lr {facts["lr"]}, seed {SEED},
  {facts["train_seconds"] / 60:.1f} min on 1 CPU thread, torch {torch.__version__}.
- Greedy continuation of "The function returns": {facts["greedy"]!r}
- Sampled (generation_config defaults, seed {SEED}): {facts["sampled"]!r}
- Date: {datetime.date.today().isoformat()}
- Command: `{facts["command"]}`
""")


def build(steps: int, lr: float, command: str):
    torch.manual_seed(SEED)
    docs = collect_documents()
    train_texts, heldout_texts = split_documents(docs)
    print(f"{len(docs)} documents: {len(train_texts)} training, {len(heldout_texts)} held out")

    tokenizer = train_tokenizer(train_texts)
    train_stream, heldout_stream = token_stream(tokenizer, train_texts), token_stream(tokenizer, heldout_texts)
    print(f"{len(train_stream)} training tokens, {len(heldout_stream)} held-out tokens")

    model = Gemma4ForCausalLM(model_config(tokenizer))
    params = sum(p.numel() for p in model.parameters())
    print(f"{params} parameters")
    train_seconds = train(model, train_stream, heldout_stream, steps, lr)

    tmp = OUT.with_name(OUT.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.token_to_id("<bos>"),
        pad_token_id=tokenizer.token_to_id("<pad>"),
        eos_token_id=[tokenizer.token_to_id(t) for t in STOP_TOKENS],
        do_sample=True,
        temperature=1.0,
        top_k=64,
        top_p=0.95,
    )
    model.to(torch.bfloat16).save_pretrained(tmp)
    # transformers 5.2x writes only `per_layer_config`; published checkpoints and mlx-lm use global_head_dim.
    config = json.loads((tmp / "config.json").read_text())
    write_json(tmp / "config.json", {**config, "global_head_dim": GLOBAL_HEAD_DIM})
    tokenizer.save(str(tmp / "tokenizer.json"))
    write_tokenizer_metadata(tmp)

    # Score what ships: the bfloat16 weights, read back, computed in float32.
    shipped = Gemma4ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    greedy, sampled = sample_continuations(shipped, tmp, "The function returns")
    facts = dict(
        model_ppl=perplexity(shipped, heldout_stream),
        unigram_ppl=unigram_perplexity(train_stream, heldout_stream, tokenizer.get_vocab_size()),
        heldout_docs=len(heldout_texts),
        heldout_tokens=len(heldout_stream),
        train_docs=len(train_texts),
        train_tokens=len(train_stream),
        steps=steps,
        lr=lr,
        train_seconds=train_seconds,
        greedy=greedy,
        sampled=sampled,
        command=command,
    )
    print(f"held-out perplexity {facts['model_ppl']:.2f}, unigram baseline {facts['unigram_ppl']:.2f}")
    print(f"greedy: {greedy!r}\nsampled: {sampled!r}")
    write_eval(tmp, facts)
    write_readme(tmp, params, steps)
    check_chat_template(tmp)
    shutil.rmtree(OUT, ignore_errors=True)
    os.replace(tmp, OUT)
    print(f"wrote {OUT}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--package-only", action="store_true", help="rewrite tokenizer metadata (chat template) of the existing model")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the target machine has 2 cores and shares them
    if args.package_only:
        write_tokenizer_metadata(OUT)
        check_chat_template(OUT)
    else:
        build(args.steps, args.lr, " ".join(["python", "scripts/train_tiny.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
