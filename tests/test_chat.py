"""Gemma 4 chat format: template rendering against the real format, and the output parser.

Expected prompts are written out by hand from Google's Gemma 4 template (see the header of
mlx_gemma4/chat_template.jinja for sources); they were checked against copies of the Hub templates.
"""

import random

import jinja2
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from transformers.utils.chat_template_utils import render_jinja_template

from mlx_gemma4.chat import (
    Event,
    OutputParser,
    default_template,
    parse_output,
    parse_tool_calls,
    render_chat,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
WEATHER_DECLARATION = (
    '<|tool>declaration:get_weather{description:<|"|>Get the weather<|"|>,parameters:{properties:{'
    'city:{description:<|"|>City name<|"|>,type:<|"|>STRING<|"|>},'
    'unit:{enum:[<|"|>celsius<|"|>,<|"|>fahrenheit<|"|>],type:<|"|>STRING<|"|>}},'
    'required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>'
)
CREATE = {
    "type": "function",
    "function": {
        "name": "create",
        "description": "Create item",
        "parameters": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "Name"},
                "config": {
                    "type": "object",
                    "description": "Config",
                    "properties": {"enabled": {"type": "boolean", "description": "On/off"}},
                },
                "tags": {"type": "array", "description": "Tags", "items": {"type": "string"}},
            },
        },
    },
}
CREATE_DECLARATION = (
    '<|tool>declaration:create{description:<|"|>Create item<|"|>,parameters:{properties:{'
    'config:{description:<|"|>Config<|"|>,properties:{enabled:{description:<|"|>On/off<|"|>,'
    'type:<|"|>BOOLEAN<|"|>}},type:<|"|>OBJECT<|"|>},'
    'name:{description:<|"|>Name<|"|>,type:<|"|>STRING<|"|>},'
    'tags:{description:<|"|>Tags<|"|>,items:{type:<|"|>STRING<|"|>},type:<|"|>ARRAY<|"|>}},'
    'type:<|"|>OBJECT<|"|>}}<tool|>'
)


def weather_call(arguments, call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


def tiny_tokenizer(chat_template=None):
    """A real Hugging Face tokenizer built offline; the vocabulary is irrelevant to rendering."""
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<|channel>", "<channel|>"])}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=chat_template,
    )


# ---------------------------------------------------------------- rendering


def test_user_turn_and_generation_prompt():
    prompt = render_chat(None, [{"role": "user", "content": "  Hello  "}])
    assert prompt == "<bos><|turn>user\nHello<turn|>\n<|turn>model\n"


def test_thinking_on_puts_think_marker_at_top_of_system_turn():
    messages = [{"role": "user", "content": "Hello"}]
    assert render_chat(None, messages, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert render_chat(None, with_system, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n"
    )


def test_thinking_off_generation_prompt_by_model_size():
    messages = [{"role": "user", "content": "Hi"}]
    # E2B/E4B form: a bare model turn. 26B/31B form: an already-closed empty thought channel.
    assert render_chat(None, messages).endswith("<turn|>\n<|turn>model\n")
    large = render_chat(None, messages, prefill_empty_thought=True)
    assert large == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    large_thinking = render_chat(None, messages, enable_thinking=True, prefill_empty_thought=True)
    assert large_thinking.endswith("<|turn>model\n")


def test_no_generation_prompt():
    prompt = render_chat(None, [{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert prompt == "<bos><|turn>user\nHi<turn|>\n"


def test_system_and_multi_turn_history_drops_earlier_thoughts():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nadd them<channel|>4", "reasoning_content": "old"},
        {"role": "user", "content": "3+3?"},
    ]
    assert render_chat(None, messages) == (
        "<bos><|turn>system\nYou are terse.<turn|>\n"
        "<|turn>user\n2+2?<turn|>\n"
        "<|turn>model\n4<turn|>\n"
        "<|turn>user\n3+3?<turn|>\n"
        "<|turn>model\n"
    )


def test_multimodal_placeholders():
    content = [{"type": "image"}, {"type": "text", "text": " What is this? "}, {"type": "audio"}]
    prompt = render_chat(None, [{"role": "user", "content": content}])
    assert prompt == "<bos><|turn>user\n<|image|>What is this?<|audio|><turn|>\n<|turn>model\n"


def test_tool_declarations():
    prompt = render_chat(None, [{"role": "user", "content": "Hi"}], tools=[WEATHER, CREATE])
    assert prompt == (
        "<bos><|turn>system\n" + WEATHER_DECLARATION + CREATE_DECLARATION + "<turn|>\n"
        "<|turn>user\nHi<turn|>\n<|turn>model\n"
    )


def test_tool_call_and_response_history():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [weather_call({"unit": "celsius", "city": "Paris"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "Thanks!"},
    ]
    assert render_chat(None, messages, tools=[WEATHER]) == (
        "<bos><|turn>system\nYou are terse." + WEATHER_DECLARATION + "<turn|>\n"
        "<|turn>user\nWeather in Paris?<turn|>\n"
        '<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>celsius<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>{"temp": 21}<|"|>}<tool_response|>'
        "21 degrees.<turn|>\n"
        "<|turn>user\nThanks!<turn|>\n"
        "<|turn>model\n"
    )


def test_gemma_native_tool_responses_with_structured_values():
    messages = [
        {"role": "user", "content": "Make it"},
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "create", "arguments": {"config": {"enabled": True}, "n": None}}}],
            "tool_responses": [{"name": "create", "response": {"id": 7, "tags": ["a", "b"], "ok": False}}],
        },
    ]
    assert render_chat(None, messages) == (
        "<bos><|turn>user\nMake it<turn|>\n"
        "<|turn>model\n<|tool_call>call:create{config:{enabled:true},n:null}<tool_call|>"
        '<|tool_response>response:create{id:7,ok:false,tags:[<|"|>a<|"|>,<|"|>b<|"|>]}<tool_response|>'
    )


def test_generation_after_tool_response_continues_the_model_turn():
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [weather_call({"city": "Oslo"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "snow"},
    ]
    head = (
        "<|turn>user\nWeather?<turn|>\n"
        '<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>snow<|"|>}<tool_response|>'
    )
    assert render_chat(None, messages) == "<bos>" + head
    thinking = render_chat(None, messages, enable_thinking=True)
    assert thinking == "<bos><|turn>system\n<|think|>\n<turn|>\n" + head + "<|channel>thought\n"
    assert OutputParser.for_prompt(thinking).feed("why\n<channel|>Snow.") == [
        Event("reasoning", "why"),
        Event("content", "Snow."),
    ]


def test_unanswered_tool_call_leaves_the_response_open():
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [weather_call({"city": "Rome"})]},
    ]
    assert render_chat(None, messages) == (
        '<bos><|turn>user\nWeather?<turn|>\n<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}'
        "<tool_call|><|tool_response>"
    )


def test_tool_call_reasoning_kept_only_after_the_last_user_turn():
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "reasoning_content": "need data", "tool_calls": [weather_call({"city": "Rome"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sun"},
    ]
    kept = "<|turn>model\n<|channel>thought\nneed data\n<channel|><|tool_call>"
    assert kept in render_chat(None, messages)
    later = [*messages, {"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "And?"}]
    assert "need data" not in render_chat(None, later)
    assert kept in render_chat(None, later, preserve_thinking=True)


def test_json_string_arguments_are_decoded_for_the_template():
    question = {"role": "user", "content": "W?"}
    as_json = [question, {"role": "assistant", "tool_calls": [weather_call('{"city": "Oslo"}')]}]
    as_dict = [question, {"role": "assistant", "tool_calls": [weather_call({"city": "Oslo"})]}]
    assert render_chat(None, as_json) == render_chat(None, as_dict)
    assert as_json[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'  # caller's copy untouched
    with pytest.raises(jinja2.TemplateError, match="mapping"):
        render_jinja_template([as_json], chat_template=default_template(), bos_token="<bos>")
    with pytest.raises(ValueError, match="not JSON"):
        render_chat(None, [{"role": "assistant", "tool_calls": [weather_call("{city: Oslo")]}])


def test_tokenizer_without_template_uses_ours_and_with_template_uses_its_own():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello"}]
    assert render_chat(tiny_tokenizer(), messages, tools=[WEATHER]) == render_chat(None, messages, tools=[WEATHER])
    own = tiny_tokenizer(chat_template="{{ bos_token }}[{{ messages[-1]['content'] }}|{{ enable_thinking }}]")
    assert render_chat(own, messages) == "<bos>[Hello|False]"


def test_thinking_stays_off_through_mlx_lm_wrapper():
    """mlx-lm's TokenizerWrapper turns thinking on for Gemma 4 unless told otherwise."""
    tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")
    wrapper = tokenizer_utils.TokenizerWrapper(tiny_tokenizer(default_template()))
    messages = [{"role": "user", "content": "Hi"}]
    assert "<|think|>" in wrapper.apply_chat_template(messages, tokenize=False)
    assert render_chat(wrapper, messages) == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"


def test_plain_jinja2_renders_the_same_as_transformers():
    """Every tag trims its own whitespace, so trim_blocks/lstrip_blocks make no difference."""
    messages = [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [weather_call({"city": "Rome", "days": [1, 2]})]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sun"}, {"type": "image"}]},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
    ]
    options = dict(tools=[WEATHER, CREATE], enable_thinking=True, add_generation_prompt=True, bos_token="<bos>")
    plain = jinja2.Environment().from_string(default_template()).render(messages=messages, **options)
    assert plain == render_chat(None, messages, tools=[WEATHER, CREATE], enable_thinking=True)


# ---------------------------------------------------------------- parsing

RICH_OUTPUT = (
    "<|channel>thought\nThe user wants weather {maybe}.\n<channel|>\n"
    "Let me check.<|tool_call>call:get-weather{city:<|\"|>São Paulo, BR: {center}<|\"|>,days:3}<tool_call|>"
    '<|tool_call>call:google:mcp:search{query:<|"|>a, b: c<|"|>,filters:{lang:[<|"|>en<|"|>,<|"|>pt<|"|>],'
    "safe:true,limit:-2.5e1,cursor:null}}<tool_call|><|tool_response>"
)
RICH_CALLS = [
    {"name": "get-weather", "arguments": {"city": "São Paulo, BR: {center}", "days": 3}},
    {
        "name": "google:mcp:search",
        "arguments": {
            "query": "a, b: c",
            "filters": {"lang": ["en", "pt"], "safe": True, "limit": -25.0, "cursor": None},
        },
    },
]


def stream(text, pieces, in_reasoning=False):
    parser = OutputParser(in_reasoning)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


def summarize(events):
    return (
        "".join(e.text for e in events if e.kind == "reasoning"),
        "".join(e.text for e in events if e.kind == "content"),
        [e.call or {"error": e.error, "raw": e.text} for e in events if e.kind.startswith("tool_call")],
    )


def random_pieces(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(40, len(text) - 1))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_thinking_is_separated_from_the_answer():
    output = "<|channel>thought\nSix times seven.\n<channel|>\n\nIt is **42**.\n<turn|>"
    assert parse_output(output) == ("Six times seven.", "It is **42**.", [])


def test_empty_thought_channel_and_plain_answers():
    assert parse_output("<|channel>thought\n<channel|>Hi there") == ("", "Hi there", [])
    assert parse_output("Just text, 1 < 2 and a <|\"|> quote") == ("", 'Just text, 1 < 2 and a <|"|> quote', [])


def test_tool_calls_with_gemma_values():
    assert parse_output(RICH_OUTPUT) == ("The user wants weather {maybe}.", "Let me check.", RICH_CALLS)


def test_several_calls_in_one_block_and_quoted_keys():
    block = (
        'call:glob{pattern:<|"|>*.md<|"|>}\n'
        'call:edit-file{<|"|>path<|"|>:<|"|>a.txt<|"|>,edits:[{old:<|"|>x<|"|>,new:""}],}'
    )
    events = parse_tool_calls(block)
    assert [e.call for e in events] == [
        {"name": "glob", "arguments": {"pattern": "*.md"}},
        {"name": "edit-file", "arguments": {"path": "a.txt", "edits": [{"old": "x", "new": ""}]}},
    ]
    assert events[0].text == 'call:glob{pattern:<|"|>*.md<|"|>}'


def test_streaming_matches_one_shot():
    one_shot = parse_output(RICH_OUTPUT)
    assert summarize(stream(RICH_OUTPUT, RICH_OUTPUT)) == one_shot  # one character at a time
    rng = random.Random(0)
    for _ in range(200):
        assert summarize(stream(RICH_OUTPUT, random_pieces(RICH_OUTPUT, rng))) == one_shot


def test_streaming_events_arrive_early_and_in_order():
    parser = OutputParser()
    assert parser.feed("<|channel>thou") == []
    assert parser.feed("ght\nStep one") == [Event("reasoning", "Step one")]
    assert parser.feed(".\n<chan") == [Event("reasoning", ".")]
    assert parser.feed("nel|>Answer <|tool_") == [Event("content", "Answer")]
    assert parser.feed('call>call:f{a:<|"|>x<|"|>}') == []
    (call,) = parser.feed("<tool_call|>")
    assert call == Event("tool_call", 'call:f{a:<|"|>x<|"|>}', call={"name": "f", "arguments": {"a": "x"}})
    assert parser.finish() == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hi <|tool_call>call:f{a:1}<tool_call|>", ("", "Hi", [{"name": "f", "arguments": {"a": 1}}])),
        ("<|channel>thought\nA<channel|>B<turn|><|turn>user\nleak", ("A", "B", [])),
        ("Done.<tool_call|><channel|> Really.<eos>", ("", "Done. Really.", [])),
        ("a <|x and <b", ("", "a <|x and <b", [])),
    ],
)
def test_markers_split_anywhere_never_leak(text, expected):
    assert parse_output(text) == expected
    assert summarize(stream(text, text)) == expected
    for cut in range(1, len(text)):
        assert summarize(stream(text, [text[:cut], text[cut:]])) == expected


def test_thought_channel_opened_by_the_prompt():
    assert parse_output("still thinking\n<channel|>Answer", in_reasoning=True) == ("still thinking", "Answer", [])
    assert OutputParser.for_prompt("...<|turn>model\n").feed("Answer") == [Event("content", "Answer")]


@pytest.mark.parametrize(
    "block, error",
    [
        ("call:f{a:1", "expected ',' or '}'"),
        ('call:f{a:<|"|>open}', "unterminated"),
        ("call:f{city:Paris}", "unquoted value 'Paris'"),
        ("f{a:1}", "call:name"),
        ("call:{a:1}", "call:name"),
        ("call:f{a:1,,b:2}", "expected a key"),
        ("call:f{a 1}", "expected ':'"),
        ("call:f{a:[1 2]}", "expected ',' or ']'"),
    ],
)
def test_malformed_call_is_an_error_value_not_an_exception(block, error):
    text = f"Before.<|tool_call>{block}<tool_call|>After."
    reasoning, content, calls = parse_output(text)
    assert content == "Before.After."
    assert len(calls) == 1 and calls[0]["raw"] == block and error in calls[0]["error"]
    assert summarize(stream(text, text)) == (reasoning, content, calls)


def test_good_calls_before_a_bad_one_survive():
    events = parse_tool_calls("call:f{a:1} call:g{b:}")
    assert [e.kind for e in events] == ["tool_call", "tool_call_error"]
    assert events[1].text == "call:g{b:}"


def test_deep_nesting_is_an_error_value():
    block = "call:f{a:" + "[" * 5000 + "]" * 5000 + "}"
    (event,) = parse_tool_calls(block)
    assert event.kind == "tool_call_error"


def test_unterminated_call_at_the_end_of_output():
    assert parse_output("<|tool_call>call:f{a:1}")[2] == [{"name": "f", "arguments": {"a": 1}}]
    assert parse_output("<|tool_call>call:f{a:1")[2][0]["raw"] == "call:f{a:1"
    assert parse_output("<|tool_call>call:f{a:1}<|tool_response>ignored")[2] == [{"name": "f", "arguments": {"a": 1}}]


ROUND_TRIP_ARGUMENTS = {
    "text": "São Paulo, {BR}: [a,b]",
    "count": 3,
    "ratio": 0.25,
    "tiny": 1e-07,
    "huge": 1e21,
    "negative": -2,
    "flags": [True, False, None],
    "nested": {"Key-with-dash": "v", "items": [{"x": 1}, [], {}]},
    "empty": "",
}


@pytest.mark.parametrize("name", ["get_weather", "get-weather", "mcp:files.read-file"])
def test_template_and_parser_round_trip(name):
    call = {"id": "c", "type": "function", "function": {"name": name, "arguments": ROUND_TRIP_ARGUMENTS}}
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "tool_calls": [call, call]}]
    prompt = render_chat(None, messages, add_generation_prompt=False)
    model_output = prompt.split("<|turn>model\n", 1)[1]
    assert parse_output(model_output) == ("", "", [{"name": name, "arguments": ROUND_TRIP_ARGUMENTS}] * 2)
