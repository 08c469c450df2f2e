"""Request and response models of the HTTP API (the engine knows none of them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

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


class SamplingFields(BaseModel):
    """Sampling options shared by every generation endpoint (llama-server's names)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 = off")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
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
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: Literal[False] = False
    logprobs: None = None
    user: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

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
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Literal[False] | None = None
    user: str | None = None


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
