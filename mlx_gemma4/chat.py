"""Gemma 4 chat format: render prompts, and split the model's output into reasoning, content and tool calls.

The model marks its output with special tokens that detokenizers render as text:
`<|channel>thought\\n...<channel|>` holds reasoning, `<|tool_call>call:name{...}<tool_call|>` a tool
call, and `<turn|>` (or `<|tool_response>`, after tool calls) ends the turn. Tool-call arguments use
Gemma's own syntax: unquoted keys, strings between `<|"|>` delimiters, bare numbers and literals.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

BOS = "<bos>"
THOUGHT_OPEN = "<|channel>"
THOUGHT_CLOSE = "<channel|>"
THOUGHT_CHANNEL = "thought"
CALL_OPEN = "<|tool_call>"
CALL_CLOSE = "<tool_call|>"
STRING_QUOTE = '<|"|>'
END_MARKERS = ("<turn|>", "<|tool_response>", "<|turn>", "<eos>")

TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")


@cache
def default_template() -> str:
    return TEMPLATE_PATH.read_text()


def render_chat(
    tokenizer_or_template: Any,
    messages: list[dict],
    tools: list[dict] | None = None,
    enable_thinking: bool = False,
    add_generation_prompt: bool = True,
    **kwargs,
) -> str:
    """Render `messages` (OpenAI/Hugging Face style dicts) into a Gemma 4 prompt string.

    `tokenizer_or_template` is a tokenizer or processor (its own chat template is used, ours when it
    has none), a template string, or None for ours. Thinking is off unless asked for: mlx-lm turns it
    on for every Gemma 4 request (ml-explore/mlx-lm#1352). Other kwargs reach the template, e.g.
    `preserve_thinking`, or `prefill_empty_thought=True` for our template's 26B/31B thinking-off prompt.
    """
    messages = [_decode_call_arguments(message) for message in messages]
    options = dict(tools=tools, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    options.update(kwargs)
    if tokenizer_or_template is None or isinstance(tokenizer_or_template, str):
        from transformers.utils.chat_template_utils import render_jinja_template

        options.setdefault("bos_token", BOS)
        template = tokenizer_or_template or default_template()
        rendered, _ = render_jinja_template([messages], chat_template=template, **options)
        return rendered[0]
    if getattr(tokenizer_or_template, "chat_template", None) is None:
        options["chat_template"] = default_template()
    return tokenizer_or_template.apply_chat_template(messages, tokenize=False, **options)


def _decode_call_arguments(message: dict) -> dict:
    """OpenAI clients send tool-call arguments as JSON text; Gemma's template needs a mapping."""
    calls = message.get("tool_calls") or []
    if not any(isinstance(call["function"].get("arguments"), str) for call in calls):
        return message
    decoded = []
    for call in calls:
        arguments = call["function"].get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                name = call["function"].get("name")
                raise ValueError(f"tool call {name!r}: arguments are not JSON: {arguments!r}") from error
            call = {**call, "function": {**call["function"], "arguments": arguments}}
        decoded.append(call)
    return {**message, "tool_calls": decoded}


EventKind = Literal["reasoning", "content", "tool_call", "tool_call_error"]


@dataclass(frozen=True)
class Event:
    """A piece of parsed output.

    `text` is reasoning or content text, or the raw text of a tool call. A `tool_call` carries
    `call = {"name": str, "arguments": dict}`; a `tool_call_error` carries `error`, why the raw
    text did not parse.
    """

    kind: EventKind
    text: str
    call: dict | None = None
    error: str | None = None


# (mode, marker) -> next mode; "end" stops parsing, None drops a stray marker and stays.
_TRANSITIONS = {
    ("content", THOUGHT_OPEN): "reasoning",
    ("content", CALL_OPEN): "tool_call",
    ("content", THOUGHT_CLOSE): None,
    ("content", CALL_CLOSE): None,
    ("reasoning", THOUGHT_CLOSE): "content",
    ("reasoning", CALL_OPEN): "tool_call",
    ("reasoning", THOUGHT_OPEN): None,
    ("tool_call", CALL_CLOSE): "content",
    **{(mode, marker): "end" for mode in ("content", "reasoning", "tool_call") for marker in END_MARKERS},
}
_MARKERS = {mode: [marker for m, marker in _TRANSITIONS if m == mode] for mode in ("content", "reasoning", "tool_call")}


class OutputParser:
    """Splits Gemma 4 output text, fed piece by piece as a detokenizer yields it, into events.

    `feed` returns the events its piece completes and `finish` the rest. Text that may begin a
    marker (`<|tool_` ...) is held back until the next piece settles it, so markers never leak
    into content. Whitespace at the edges of each reasoning or content span is dropped. After an
    end-of-turn marker the rest of the text is ignored. Nothing here raises on bad model output:
    a tool call that does not parse becomes a `tool_call_error` event.
    """

    def __init__(self, in_reasoning: bool = False):
        self._mode = "reasoning" if in_reasoning else "content"
        self._pending = ""  # text not yet passed on: at most an unfinished marker between feeds
        self._call: list[str] = []  # text of the tool-call block being read
        self._name_next = False  # a thought channel just opened: its name ("thought\n") comes first
        self._space = ""  # trailing whitespace of the span, emitted only if the span goes on
        self._span_start = True

    @classmethod
    def for_prompt(cls, prompt: str) -> OutputParser:
        """A parser for the output of `prompt`, which may leave a thought channel open (the
        template does so after a tool response when thinking is on)."""
        return cls(in_reasoning=prompt.endswith(THOUGHT_OPEN + THOUGHT_CHANNEL + "\n"))

    def feed(self, piece: str) -> list[Event]:
        self._pending += piece
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while self._mode != "end":
            if self._mode == "reasoning" and self._name_next and not self._strip_channel_name(final):
                break
            marker, at = self._first_marker()
            if marker is None:
                self._emit_settled(events, final)
                break
            text, self._pending = self._pending[:at], self._pending[at + len(marker) :]
            self._transition(marker, text, events)
        if final:
            self._end_span()
        return events

    def _strip_channel_name(self, final: bool) -> bool:
        """Drop the channel name after `<|channel>`; False while it may still be arriving."""
        pending, header = self._pending, THOUGHT_CHANNEL + "\n"
        if not final and len(pending) < len(header) and header.startswith(pending):
            return False
        if pending.startswith(THOUGHT_CHANNEL):
            self._pending = pending[len(THOUGHT_CHANNEL) :].removeprefix("\n")
        self._name_next = False
        return True

    def _first_marker(self) -> tuple[str | None, int]:
        found = [(at, m) for m in _MARKERS[self._mode] if (at := self._pending.find(m)) >= 0]
        if not found:
            return None, -1
        at, marker = min(found)
        return marker, at

    def _emit_settled(self, events: list[Event], final: bool) -> None:
        """Pass on pending text, keeping back what could still become a marker."""
        keep = 0 if final else _partial_marker_length(self._pending, _MARKERS[self._mode])
        split = len(self._pending) - keep
        settled, self._pending = self._pending[:split], self._pending[split:]
        if self._mode != "tool_call":
            self._emit(settled, events)
            return
        self._call.append(settled)
        if final:
            self._parse_call_block(events)

    def _parse_call_block(self, events: list[Event]) -> None:
        block, self._call = "".join(self._call), []
        if block.strip():
            events.extend(parse_tool_calls(block))

    def _transition(self, marker: str, text: str, events: list[Event]) -> None:
        after = _TRANSITIONS[(self._mode, marker)]
        if self._mode == "tool_call":
            self._call.append(text)
            self._parse_call_block(events)
        else:
            self._emit(text, events)
        if after is None:
            self._name_next = marker == THOUGHT_OPEN
            return
        self._end_span()
        self._name_next = after == "reasoning"
        self._mode = after

    def _emit(self, text: str, events: list[Event]) -> None:
        if self._span_start:
            text = text.lstrip()
            self._span_start = not text
        body = text.rstrip()
        if body:
            _append(events, Event(self._mode, self._space + body))
            self._space = ""
        self._space += text[len(body) :]

    def _end_span(self) -> None:
        self._space = ""
        self._span_start = True


def _append(events: list[Event], event: Event) -> None:
    """Append, merging text into the previous event of the same kind."""
    if events and events[-1].kind == event.kind and event.kind in ("reasoning", "content"):
        events[-1] = Event(event.kind, events[-1].text + event.text)
    else:
        events.append(event)


def _partial_marker_length(text: str, markers: list[str]) -> int:
    """Length of the longest end of `text` that is an unfinished start of a marker."""
    for start in range(max(0, len(text) - max(map(len, markers)) + 1), len(text)):
        tail = text[start:]
        if any(marker.startswith(tail) for marker in markers):
            return len(text) - start
    return 0


def parse_output(text: str, in_reasoning: bool = False) -> tuple[str, str, list[dict]]:
    """Parse a whole output into (reasoning, content, tool_calls).

    Each tool call is `{"name", "arguments"}`, or `{"error", "raw"}` when it did not parse.
    """
    parser = OutputParser(in_reasoning)
    events = parser.feed(text) + parser.finish()
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    content = "".join(e.text for e in events if e.kind == "content")
    calls = [
        e.call if e.kind == "tool_call" else {"error": e.error, "raw": e.text}
        for e in events
        if e.kind in ("tool_call", "tool_call_error")
    ]
    return reasoning, content, calls


# ---- tool-call syntax: call:name{key:value,...}, possibly several calls in one block ----

_SPACE = re.compile(r"\s*")
_CALL_HEAD = re.compile(r"call:\s*([^\s{}]+)\s*\{")
_BARE_KEY = re.compile(r"[^\s:,{}\[\]]+")
_BARE_WORD = re.compile(r"[^\s,{}\[\]]+")
_INTEGER = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None}


class ToolCallSyntaxError(ValueError):
    pass


def parse_tool_calls(block: str) -> list[Event]:
    """Parse the text between `<|tool_call>` and `<tool_call|>`: one or more `call:name{...}`.

    Calls that parse become `tool_call` events; from the first that does not, the rest of the
    block becomes one `tool_call_error` event.
    """
    events = []
    pos = _skip_space(block, 0)
    while pos < len(block):
        try:
            name, arguments, end = _parse_call(block, pos)
        except (ToolCallSyntaxError, RecursionError) as error:
            events.append(Event("tool_call_error", block[pos:], error=str(error) or "nesting too deep"))
            break
        events.append(Event("tool_call", block[pos:end], call={"name": name, "arguments": arguments}))
        pos = _skip_space(block, end)
    return events


def _parse_call(text: str, pos: int) -> tuple[str, dict, int]:
    head = _CALL_HEAD.match(text, pos)
    if head is None:
        raise ToolCallSyntaxError(f"expected 'call:name{{' at offset {pos}")
    arguments, end = _parse_object(text, head.end() - 1)
    return head.group(1), arguments, end


def _parse_value(text: str, pos: int) -> tuple[Any, int]:
    if text.startswith(STRING_QUOTE, pos):
        close = text.find(STRING_QUOTE, pos + len(STRING_QUOTE))
        if close < 0:
            raise ToolCallSyntaxError(f"unterminated <|\"|> string at offset {pos}")
        return text[pos + len(STRING_QUOTE) : close], close + len(STRING_QUOTE)
    if text.startswith('"', pos):
        try:
            return json.JSONDecoder().raw_decode(text, pos)
        except json.JSONDecodeError as error:
            raise ToolCallSyntaxError(f"bad JSON string at offset {pos}") from error
    if text.startswith("{", pos):
        return _parse_object(text, pos)
    if text.startswith("[", pos):
        return _parse_array(text, pos)
    word = _BARE_WORD.match(text, pos)
    if word is None:
        raise ToolCallSyntaxError(f"expected a value at offset {pos}")
    return _literal(word.group(), pos), word.end()


def _literal(word: str, pos: int) -> Any:
    if word in _LITERALS:
        return _LITERALS[word]
    if _INTEGER.fullmatch(word):
        return int(word)
    if _NUMBER.fullmatch(word):
        return float(word)
    raise ToolCallSyntaxError(f"unquoted value {word!r} at offset {pos}")


def _parse_key(text: str, pos: int) -> tuple[str, int]:
    if text.startswith((STRING_QUOTE, '"'), pos):
        key, end = _parse_value(text, pos)
        return key, end
    bare = _BARE_KEY.match(text, pos)
    if bare is None:
        raise ToolCallSyntaxError(f"expected a key at offset {pos}")
    return bare.group(), bare.end()


def _parse_object(text: str, pos: int) -> tuple[dict, int]:
    result = {}

    def member(at: int) -> int:
        key, at = _parse_key(text, at)
        at = _expect(text, _skip_space(text, at), ":")
        result[key], at = _parse_value(text, _skip_space(text, at))
        return at

    return result, _parse_sequence(text, pos, "}", member)


def _parse_array(text: str, pos: int) -> tuple[list, int]:
    result = []

    def item(at: int) -> int:
        value, at = _parse_value(text, at)
        result.append(value)
        return at

    return result, _parse_sequence(text, pos, "]", item)


def _parse_sequence(text: str, pos: int, close: str, element) -> int:
    """Parse `open element, element ... close` (a trailing comma allowed); return the end offset."""
    pos = _skip_space(text, pos + 1)
    while not text.startswith(close, pos):
        pos = _skip_space(text, element(pos))
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith(close, pos):
            raise ToolCallSyntaxError(f"expected ',' or {close!r} at offset {pos}")
    return pos + 1


def _expect(text: str, pos: int, token: str) -> int:
    if not text.startswith(token, pos):
        raise ToolCallSyntaxError(f"expected {token!r} at offset {pos}")
    return pos + len(token)


def _skip_space(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()
