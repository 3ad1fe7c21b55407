"""Pydantic models of the OpenAI-compatible routes (``model`` is the task name)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.protocol.generate import MAX_BATCH_INPUTS, GenerationParameters, Usage

FinishReason = Literal["stop", "length"]


def finish_reason(engine_reason: str | None) -> FinishReason | None:
    """OpenAI's finish_reason for the engine's (``length``; ``eos`` and ``stop`` are "stop"),
    the one mapping both OpenAI routes use; None while a stream still runs."""
    if engine_reason is None:
        return None
    return "length" if engine_reason == "length" else "stop"


class CompletionRequest(BaseModel):
    # Unknown OpenAI fields are ignored (clients send many); known ones are strictly typed.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(default=..., description="a task name, or the base model (its id or 'base')")
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(default=1, description="only 1 is supported")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    ignore_eos: bool = Field(default=False, description="rankone/vLLM extension: past EOS")

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.n != 1:
            raise ValueError("n: only n=1 is supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        if self.echo:
            raise ValueError("echo: not supported")
        if self.logprobs:
            raise ValueError("logprobs: not supported")
        if isinstance(self.prompt, list) and not 1 <= len(self.prompt) <= MAX_BATCH_INPUTS:
            raise ValueError(f"prompt: give 1 to {MAX_BATCH_INPUTS} prompts")
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1:
            raise ValueError("stream: streaming takes a single prompt")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def parameters(self) -> GenerationParameters:
        return GenerationParameters.model_validate(
            {
                "max_new_tokens": self.max_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "stop": self.stop,
                "seed": self.seed,
                "ignore_eos": self.ignore_eos,
            }
        )


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (then ``data: [DONE]``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rankone"
    parent: str | None = Field(
        default=None, description="a task's base model; null for the base model itself"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
