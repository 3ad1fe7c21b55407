"""Pydantic models of ``POST /v1/chat/completions`` (OpenAI-compatible; ``model`` is the task)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from prompts.chat import ROLES
from service.protocol.generate import MAX_BATCH_INPUTS, GenerationParameters, Usage
from service.protocol.openai import FinishReason

MAX_MESSAGES = 256
Role = Literal["system", "developer", "user", "assistant", "tool"]
assert set(ROLES) == set(Role.__args__)  # type: ignore[attr-defined]


class TextPart(BaseModel):
    """One part of a multi-part content list; only text parts are accepted."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"] = Field(default=..., description="only text parts are supported")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Role
    content: str | list[TextPart] = Field(
        default=..., description="the message text, or a list of text parts (joined)"
    )
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown OpenAI fields are ignored (clients send many); known ones are strictly typed:
    # "5" is not 5, 0 is not false, "true" is not true (as on every other route).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(default=..., description="a task name, or the base model (its id or 'base')")
    messages: list[ChatMessage] = Field(
        default=..., min_length=1, max_length=MAX_MESSAGES, description="the conversation"
    )
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(
        default=None, ge=1, description="deprecated name of max_completion_tokens"
    )
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_BATCH_INPUTS, description="choices to generate")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    user: str | None = None
    ignore_eos: bool = Field(default=False, description="rankone/vLLM extension: past EOS")

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _zero_penalty(cls, value: float | None) -> float | None:
        if value not in (None, 0, 0.0):
            raise ValueError("not supported (only 0)")
        return value

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs: not supported")
        if self.tools:
            raise ValueError("tools: tool calls are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format: only text is supported")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ: give one of them")
        return self

    @property
    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text} for m in self.messages]

    def parameters(self) -> GenerationParameters:
        return GenerationParameters.model_validate(
            {
                "max_new_tokens": self.max_completion_tokens or self.max_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "stop": self.stop,
                "seed": self.seed,
                "ignore_eos": self.ignore_eos,
            }
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    """What changed in a choice: its fields are sent only when set, as OpenAI's deltas."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler: SerializerFunctionWrapHandler) -> Any:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (then ``data: [DONE]``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
