"""Pydantic models of the files and fine-tuning routes (OpenAI's shapes, rankone's extensions).

Job and file documents are returned as stored dicts (OpenAI's ``fine_tuning.job`` and ``file``
objects); these models are the requests, validated with bounds.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Auto = Literal["auto"]
# Answers every route here may give, as {"error": {"code", "message"}} (service/api/errors.py)
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed JSON body"},
    401: {"description": "missing or unknown API key"},
    403: {"description": "not an admin key"},
    413: {"description": "body over the server's limit"},
    503: {"description": "the job store is unavailable"},
}
MAX_EVENTS_PER_POST = 100
# Bodies are strict, as on every route: "5" is not 5, true is not 1, "true" is not true.
STRICT = ConfigDict(extra="forbid", strict=True)


class Hyperparameters(BaseModel):
    model_config = STRICT

    n_epochs: int | Auto = Field(
        default="auto", description="passes over the training file (1-100)"
    )
    batch_size: int | Auto = Field(default="auto", description="examples per step (1-256)")
    learning_rate_multiplier: float | Auto = Field(
        default="auto", description="× the server's base learning rate (0 < m ≤ 10)"
    )
    steps: int | None = Field(
        default=None, ge=1, description="rankone: optimizer steps (overrides n_epochs)"
    )
    instruction: str | None = Field(
        default=None,
        min_length=1,
        max_length=2000,
        description="rankone: what the task does, in words (prompt tuning starts from its "
        "token embeddings); the same as rankone.instruction",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Hyperparameters:
        if isinstance(self.n_epochs, int) and not 1 <= self.n_epochs <= 100:
            raise ValueError(f"n_epochs must be 1-100 or 'auto', got {self.n_epochs}")
        if isinstance(self.batch_size, int) and not 1 <= self.batch_size <= 256:
            raise ValueError(f"batch_size must be 1-256 or 'auto', got {self.batch_size}")
        m = self.learning_rate_multiplier
        if not isinstance(m, str) and not 0 < m <= 10:
            raise ValueError(f"learning_rate_multiplier must be in (0, 10] or 'auto', got {m}")
        return self


class RankoneOptions(BaseModel):
    """rankone's own job options (the ``rankone`` field, e.g. the openai client's extra_body)."""

    model_config = STRICT

    mode: Literal["auto", "factors-only", "paper", "prompt-tuning"] = Field(
        default="auto",
        description="auto: the job chooses the method, learning rate and steps on held-out "
        "examples (the validation file, or a part of the training file); factors-only: the "
        "shared prompt stays frozen, only (L + d)·r numbers train; paper: the shared prompt "
        "trains too (the task gets its own); prompt-tuning: a plain prompt, its own shared "
        "prompt with U = V = 1 (paper and prompt-tuning choose lr and steps as auto does)",
    )
    instruction: str | None = Field(
        default=None,
        min_length=1,
        max_length=2000,
        description="what the task does, in words: prompt tuning starts from its token "
        "embeddings and factors from their closest fit (optional)",
    )
    shots: int | None = Field(default=None, ge=1, description="keep k training examples (seeded)")
    replace: bool = Field(
        default=False, description="replace an existing task of that name (a new version)"
    )
    eval_every: int = Field(
        default=0, ge=0, description="validation every N steps (0 = at the end)"
    )


class SupervisedMethod(BaseModel):
    model_config = STRICT

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = STRICT

    type: Literal["supervised"] = Field(description="only supervised fine-tuning is supported")
    supervised: SupervisedMethod | None = None


class JobCreate(BaseModel):
    model_config = STRICT

    model: str = Field(description="the shared prompt to adapt from (GET /v1/shared-prompts)")
    training_file: str = Field(description="id of an uploaded file, purpose fine-tune")
    validation_file: str | None = None
    suffix: str | None = Field(default=None, description="the new task's name")
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    integrations: list[Any] | None = Field(default=None, description="not supported (empty)")
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    rankone: RankoneOptions = Field(default_factory=RankoneOptions)

    @model_validator(mode="after")
    def _supported(self) -> JobCreate:
        if self.integrations:
            raise ValueError("integrations: not supported")
        if self.hyperparameters is not None and self.method is not None:
            raise ValueError("give hyperparameters or method.supervised.hyperparameters, not both")
        given = {self.rankone.instruction, self.chosen_hyperparameters().instruction} - {None}
        if len(given) > 1:
            raise ValueError("hyperparameters.instruction and rankone.instruction differ")
        return self

    def instruction(self) -> str | None:
        return self.rankone.instruction or self.chosen_hyperparameters().instruction

    def chosen_hyperparameters(self) -> Hyperparameters:
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters or Hyperparameters()
        return self.hyperparameters or Hyperparameters()


# --- the worker protocol (admin key) ---------------------------------------------------------


class ClaimRequest(BaseModel):
    model_config = STRICT

    worker: str = Field(min_length=1, max_length=128, description="the worker's name, for events")
    lease_s: float | None = Field(default=None, gt=0, le=3600, description="lease length")
    backbone: str | None = Field(
        default=None, description="the worker's backbone fingerprint (refused if it differs)"
    )


class LeaseRequest(BaseModel):
    model_config = STRICT

    lease_token: str = Field(min_length=1, max_length=200)


class ProgressEvent(BaseModel):
    model_config = STRICT

    step: int = Field(ge=0)
    total_steps: int | None = Field(default=None, ge=1)
    train_loss: float | None = Field(default=None, allow_inf_nan=False)
    valid_loss: float | None = Field(default=None, allow_inf_nan=False)
    valid_accuracy: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    message: str | None = Field(default=None, max_length=2000)


class EventsPost(LeaseRequest):
    events: list[ProgressEvent] = Field(min_length=1, max_length=MAX_EVENTS_PER_POST)


class ResultPost(LeaseRequest):
    factors: str = Field(min_length=1, description="base64 safetensors task blob")
    shared_prompt: str | None = Field(
        default=None,
        min_length=1,
        description="base64 safetensors shared-prompt blob the task composes with, when the "
        "job made its own (paper mode, prompt tuning); registered before the task",
    )
    metrics: dict[str, float | int | str | None] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _finite(self) -> ResultPost:
        for key, value in self.metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"metrics.{key}: must be a finite number or null, got {value}")
        return self


class FailurePost(LeaseRequest):
    code: str = Field(default="worker_error", max_length=64)
    message: str = Field(min_length=1, max_length=4000)
