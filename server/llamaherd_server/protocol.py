"""Request and response models of the HTTP API (the engine knows none of them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

# Higher runs first. Names are accepted too, in the body and in the X-Priority header.
PRIORITY_NAMES = {"low": 0, "normal": 1, "medium": 1, "high": 2, "critical": 3}
MAX_PRIORITY = 9


def parse_priority(value: Any) -> int:
    """An integer from 0 to 9, or low/normal/medium/high/critical."""
    if isinstance(value, bool):
        raise ValueError(
            "priority must be an integer from 0 to 9 or one of " + ", ".join(PRIORITY_NAMES)
        )
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PRIORITY_NAMES:
            return PRIORITY_NAMES[text]
        try:
            value = int(text)
        except ValueError:
            raise ValueError(
                f"unknown priority {value!r}: use an integer from 0 to {MAX_PRIORITY} "
                f"or one of {', '.join(PRIORITY_NAMES)}"
            ) from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise ValueError(
            f"unknown priority {value!r}: use an integer from 0 to {MAX_PRIORITY} "
            f"or one of {', '.join(PRIORITY_NAMES)}"
        )
    return value


Priority = Annotated[int, BeforeValidator(parse_priority)]
Stop = str | list[str] | None


def refused_unless(neutral: str, is_neutral: Callable[[Any], bool]) -> AfterValidator:
    """The check of an OpenAI field that this server does not honour: null and the values that
    ask for nothing (``neutral``, e.g. ``n: 1``, ``tools: []``) pass; anything else is a 400
    that names the field (error type ``unsupported``), never silently ignored."""

    def check(value: Any) -> Any:
        if value is None or is_neutral(value):
            return value
        raise PydanticCustomError(
            "unsupported",
            "not supported by this server (accepted: null or {neutral})",
            {"neutral": neutral},
        )

    return AfterValidator(check)


def accepted_schema(neutral: str, schema: dict[str, Any]) -> WithJsonSchema:
    """The schema of such a field: only what is accepted, so that a schema-valid request
    is never refused for it."""
    return WithJsonSchema(
        {
            "anyOf": [schema, {"type": "null"}],
            "default": None,
            "description": f"not supported: only null or {neutral}",
        }
    )


def _empty(value: Any) -> bool:
    return isinstance(value, list | dict) and not value


def _is(*accepted: Any) -> Callable[[Any], bool]:
    return lambda value: any(value == a and type(value) is type(a) for a in accepted)


def _never(value: Any) -> bool:
    return False


OneChoice = Annotated[
    Any, refused_unless("1", _is(1)), accepted_schema("1", {"type": "integer", "enum": [1]})
]
NoLogitBias = Annotated[
    Any, refused_unless("{}", _empty), accepted_schema("{}", {"type": "object", "maxProperties": 0})
]
NoTools = Annotated[
    Any, refused_unless("[]", _empty), accepted_schema("[]", {"type": "array", "maxItems": 0})
]
NoToolChoice = Annotated[
    Any,
    refused_unless('"none" or "auto"', _is("none", "auto")),
    accepted_schema('"none" or "auto"', {"type": "string", "enum": ["none", "auto"]}),
]
NullOnly = Annotated[Any, refused_unless("null", _never), accepted_schema("null", {"type": "null"})]
Off = Annotated[
    Any,
    refused_unless("false", _is(False)),
    accepted_schema("false", {"type": "boolean", "enum": [False]}),
]
Zero = Annotated[
    Any, refused_unless("0", _is(0)), accepted_schema("0", {"type": "integer", "enum": [0]})
]
TextOnly = Annotated[
    Any,
    refused_unless('{"type": "text"}', lambda v: v == {"type": "text"}),
    accepted_schema(
        '{"type": "text"}',
        {
            "type": "object",
            "properties": {"type": {"type": "string", "enum": ["text"]}},
            "required": ["type"],
            "additionalProperties": False,
        },
    ),
]
TextModality = Annotated[
    Any,
    refused_unless('["text"]', lambda v: v == ["text"]),
    accepted_schema(
        '["text"]', {"type": "array", "items": {"enum": ["text"]}, "minItems": 1, "maxItems": 1}
    ),
]
EmptySuffix = Annotated[
    Any, refused_unless('""', _is("")), accepted_schema('""', {"type": "string", "maxLength": 0})
]


class SamplingFields(BaseModel):
    """Sampling options shared by every generation endpoint (llama-server's names)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 = off")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(
        default=None,
        ge=-(2**63),
        le=2**64 - 1,
        description="reduced to 32 bits as llama.cpp does; -1 (2**32 - 1) or none: random",
    )
    stop: Stop = Field(default=None, description="up to 4 strings that end generation")
    ignore_eos: bool = Field(default=False, description="keep generating past end-of-sequence")
    priority: Priority | None = Field(
        default=None, description="higher runs first; the X-Priority header wins over it"
    )


class GenerateRequest(SamplingFields):
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(default=100, ge=1)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)


class GenerateResponse(BaseModel):
    request_id: str
    text: str
    tokens_generated: int
    latency_ms: float
    batch_wait_ms: float
    prompt_tokens: int
    finish_reason: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(SamplingFields):
    model: str | None = None
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="accepted and not used")
    # OpenAI's fields that this server does not honour: refused unless they ask for nothing.
    n: OneChoice = None
    best_of: OneChoice = None
    echo: Off = None
    logprobs: Zero = None
    logit_bias: NoLogitBias = None
    suffix: EmptySuffix = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, description="accepted and not used")
    tool_calls: NoTools = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="accepted and not used")
    # Accepted and not used: they do not change the answer.
    metadata: dict[str, str] | None = Field(default=None, description="accepted and not used")
    store: bool | None = Field(default=None, description="accepted and not used")
    service_tier: str | None = Field(default=None, description="accepted and not used")
    parallel_tool_calls: bool | None = Field(
        default=None, description="accepted and not used (no tools)"
    )
    # OpenAI's fields that this server does not honour: refused unless they ask for nothing.
    n: OneChoice = None
    logprobs: Off = None
    top_logprobs: Zero = None
    logit_bias: NoLogitBias = None
    tools: NoTools = None
    tool_choice: NoToolChoice = None
    functions: NoTools = None
    function_call: NoToolChoice = None
    response_format: TextOnly = None
    modalities: TextModality = None
    audio: NullOnly = None
    prediction: NullOnly = None
    reasoning_effort: NullOnly = None
    web_search_options: NullOnly = None


# ---- responses (documented in the OpenAPI schema; the fuzz tests hold the server to them) --


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


def error_body(
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error shape, which its client turns into a typed exception."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice] = Field(min_length=1, max_length=1)
    usage: Usage


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice] = Field(min_length=1, max_length=1)
    usage: Usage
