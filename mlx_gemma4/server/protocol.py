"""OpenAI request schemas, their validation, and the error body every failure is answered with.

Fields we do not use (user, metadata, store, ...) are accepted and ignored, as OpenAI's own server
does for most of them; fields we cannot honour (n > 1, echo) are refused with a 400 rather than
silently dropped. Extensions: top_k, min_p, repetition_penalty, max_image_tokens,
chat_template_kwargs.enable_thinking.
"""

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..model.gemma4 import IMAGE_BUDGETS


class APIError(Exception):
    """An error answered as OpenAI answers it: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class ImageURL(_Schema):
    url: str
    detail: Optional[Literal["auto", "low", "high"]] = None


class ImagePart(_Schema):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Schema):
    data: str
    format: str = "wav"


class AudioPart(_Schema):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[Union[TextPart, ImagePart, AudioPart], Field(discriminator="type")]


class FunctionCall(_Schema):
    name: str
    arguments: Union[str, dict] = "{}"


class ToolCall(_Schema):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class FunctionDefinition(_Schema):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class Tool(_Schema):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Schema):
    name: str


class NamedToolChoice(_Schema):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Schema):
    include_usage: bool = False


class _GenerationRequest(_Schema):
    model: str
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, bias):
        if bias and not all(k.isdigit() for k in bias):
            raise ValueError("logit_bias keys must be token ids")
        return bias


class ChatRequest(_GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    max_image_tokens: Optional[Literal[IMAGE_BUDGETS]] = None  # extension: soft tokens per image


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[str], list[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo):
        if echo:
            raise ValueError("echo is not supported")
        return echo


def validation_message(errors: list[dict]) -> tuple[str, Optional[str]]:
    """One readable line (and the offending parameter) from pydantic's errors."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the body must be a JSON object", None
    return f"{param or 'body'}: {first['msg']}", param
