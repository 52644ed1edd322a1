"""Command lines: `mlx_gemma4.generate` (one prompt) and `mlx_gemma4.chat` (a REPL with history).

Flags follow mlx_lm.generate. Without --model the bundled tiny model is used, so both work offline.
Errors become one line on stderr and exit status 1.
"""

import argparse
import json
import sys

from . import BUNDLED_MODEL, load
from .chat import OutputParser, render_chat
from .generate import SamplingParams, stream_generate
from .prompt_cache import PromptCache
from .quantized_cache import SCHEMES, KVQuantConfig


def add_model_and_sampling_args(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default=str(BUNDLED_MODEL), help="model folder or hub id (default: bundled tiny model)")
    parser.add_argument("--max-tokens", "-m", type=int, default=256)
    parser.add_argument("--temp", type=float, help="sampling temperature (default: the checkpoint's, 0 = greedy)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--system-prompt", help="system message for the chat template")
    parser.add_argument("--thinking", action="store_true", help="let the model think before answering (off by default)")
    parser.add_argument("--verbose", action="store_true", help="print speed and memory after the answer")
    add_kv_quant_arguments(parser)


def add_kv_quant_arguments(parser):
    """The KV-cache quantization flags, shared with the server."""
    parser.add_argument("--kv-quant", choices=SCHEMES, default="none", help="KV-cache quantization on every layer")
    parser.add_argument("--kv-bits", type=int, default=4, help="KV-cache bits (keys; values too unless --kv-bits-v)")
    parser.add_argument("--kv-bits-v", type=int, help="KV-cache bits of the values")
    parser.add_argument("--kv-recent", type=int, default=0,
                        help="TurboQuant: also keep the newest N tokens' keys/values in full precision")


def sampling_from(args) -> SamplingParams:
    return SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def kv_quant_from(args):
    """The KVQuantConfig the flags ask for, None for the plain bf16 cache."""
    config = KVQuantConfig(args.kv_quant, bits=args.kv_bits, bits_v=args.kv_bits_v, recent=args.kv_recent)
    return config if config.enabled else None


def chat_prompt(tokenizer, messages: list, thinking: bool) -> str:
    return render_chat(tokenizer, messages, enable_thinking=thinking)


def stream_reply(model, tokenizer, prompt: str, args, prompt_cache=None, raw: bool = False) -> str:
    """Print the answer to stdout as it streams (reasoning to stderr, tool calls as JSON lines).

    `prompt` is a rendered chat prompt (it carries its own <bos>), or raw text when `raw`; media from
    --image/--audio/--video fill its `<|image|>`... markers.
    Returns the answer's text, which is what the chat history keeps.
    """
    media = None
    if getattr(args, "image", None) or getattr(args, "audio", None) or getattr(args, "video", None):
        from .processing import prepare_inputs

        ids, media = prepare_inputs(model, tokenizer, prompt, args.image or (), args.audio or (), args.video or (),
                                    args.image_tokens)  # fmt: skip
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=raw)
    parser, answer, last = OutputParser.for_prompt(prompt), "", None
    for last in stream_generate(model, tokenizer, ids, max_tokens=args.max_tokens, sampling=sampling_from(args),
                                prompt_cache=prompt_cache, kv_quant=kv_quant_from(args), media=media):
        events = parser.feed(last.text) + (parser.finish() if last.finish_reason else [])
        for event in events:
            if event.kind == "content":
                sys.stdout.write(event.text)
                answer += event.text
            elif event.kind == "reasoning":
                sys.stderr.write(event.text)
            else:
                print(json.dumps({event.kind: event.call or {"raw": event.text, "error": event.error}}))
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose and last is not None:
        print(f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s\n"
              f"generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s\n"
              f"peak memory: {last.peak_memory:.3f} GB", file=sys.stderr)
    return answer


def generate_main(argv=None):
    parser = argparse.ArgumentParser(prog="mlx_gemma4.generate", description="Generate text with a Gemma 4 model.")
    add_model_and_sampling_args(parser)
    parser.add_argument("--prompt", "-p", default="Hello", help="the prompt; '-' reads it from stdin")
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    parser.add_argument("--image", action="append", help="an image (path or URL) before the prompt; repeatable")
    parser.add_argument("--audio", action="append", help="an audio clip (path or URL; E2B/E4B); repeatable")
    parser.add_argument("--video", action="append", help="a video (path or URL; PyAV decodes files, Pillow animated GIF/WebP); repeatable")
    parser.add_argument("--image-tokens", type=int, choices=(70, 140, 280, 560, 1120),
                        help="soft tokens per image (default: the checkpoint's, 280); more reads finer detail")
    args = parser.parse_args(argv)
    try:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        kv_quant_from(args)  # bad bits fail before the model loads
        model, tokenizer = load(args.model)
        if not args.no_chat_template:
            messages = ([{"role": "system", "content": args.system_prompt}] if args.system_prompt else [])
            media = [{"type": kind} for kind in ("image", "audio", "video") for _ in getattr(args, kind) or ()]
            content = media + [{"type": "text", "text": prompt}] if media else prompt
            prompt = chat_prompt(tokenizer, messages + [{"role": "user", "content": content}], args.thinking)
        stream_reply(model, tokenizer, prompt, args, raw=args.no_chat_template)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"mlx_gemma4.generate: error: {error}", file=sys.stderr)
        sys.exit(1)


def chat_main(argv=None):
    parser = argparse.ArgumentParser(prog="mlx_gemma4.chat", description="Chat with a Gemma 4 model.")
    add_model_and_sampling_args(parser)
    args = parser.parse_args(argv)
    try:
        kv_quant = kv_quant_from(args)
        model, tokenizer = load(args.model)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"mlx_gemma4.chat: error: {error}", file=sys.stderr)
        sys.exit(1)
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    history, prompt_cache = list(system), PromptCache(model, kv_quant)
    print("Type a message; /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history, prompt_cache = list(system), PromptCache(model, kv_quant)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = stream_reply(model, tokenizer, chat_prompt(tokenizer, history, args.thinking), args, prompt_cache)
        history.append({"role": "assistant", "content": reply})
