"""Pydantic models of the native API: registry (admin) and generation."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from service.engine.base import SAMPLING_EPS, SamplingParams
from service.protocol.errors import ErrorDetail
from service.protocol.metadata import check_json

MAX_STOP = 8
MAX_BATCH_INPUTS = 64
MIN_REPETITION_PENALTY = 0.01
Metadata = Annotated[dict[str, Any], AfterValidator(check_json)]
# Request bodies are strict: "5" is not 5, 0 is not false, true is not a number. A client
# that sends the wrong type learns it (422) instead of getting a guess.
STRICT = ConfigDict(extra="forbid", strict=True)


class GenerationParameters(BaseModel):
    """Sampling parameters; unset fields fall back to the task's defaults, then the server's."""

    model_config = STRICT

    max_new_tokens: int | None = Field(
        default=None,
        ge=1,
        description="tokens to generate at most (default: the task's, else the server's, "
        "lowered to what fits the model's positions)",
    )
    temperature: float | None = Field(
        default=None,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description=f"0 → greedy; below {SAMPLING_EPS:g} sampling is greedy too",
    )
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0, description="0 → off")
    seed: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="per-request sampling seed"
    )
    stop: str | list[str] | None = Field(default=None, description=f"up to {MAX_STOP} stop strings")
    repetition_penalty: float | None = Field(
        default=None,
        ge=MIN_REPETITION_PENALTY,
        le=10,
        allow_inf_nan=False,
        description="1 → off; logits of seen tokens are divided (>1 discourages repeats)",
    )
    ignore_eos: bool | None = Field(
        default=None,
        description="true: generate max_new_tokens even past the end-of-sequence token "
        "(stop strings still stop); for benchmarks with fixed output lengths",
    )

    @model_validator(mode="after")
    def _stops(self) -> GenerationParameters:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings")
        return self

    def merged_over(self, defaults: dict[str, Any]) -> GenerationParameters:
        """These parameters with unset fields taken from ``defaults`` (a task's)."""
        own = self.model_dump(exclude_none=True)
        return GenerationParameters.model_validate({**defaults, **own})

    def to_sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_new_tokens=self.max_new_tokens or default_max_new_tokens,
            temperature=self.temperature if self.temperature is not None else 0.0,
            top_p=self.top_p if self.top_p is not None else 1.0,
            top_k=self.top_k or 0,
            repetition_penalty=self.repetition_penalty or 1.0,
            seed=self.seed,
            stop=tuple(stops),
            ignore_eos=bool(self.ignore_eos),
        )


# --- registry -----------------------------------------------------------------------------

Matrix = list[list[float]]


def _is_flat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and not any(isinstance(x, list) for x in value)


class SharedPromptCreate(BaseModel):
    """A shared prompt: ``blob`` (a trainer's safetensors file, base64), or ``id`` + ``prompt``
    [L, d] as JSON numbers (``backbone`` then defaults to the server's fingerprint)."""

    model_config = STRICT

    blob: str | None = Field(
        default=None, min_length=1, description="base64 of the safetensors shared-prompt blob"
    )
    id: str | None = Field(
        default=None, description="shared prompt id (with prompt; PUT takes it from the URL)"
    )
    prompt: Matrix | None = Field(default=None, description="[L, d] shared prompt (with id)")
    backbone: str | None = Field(
        default=None,
        description="backbone fingerprint the prompt was trained on (with prompt); omitted → "
        "the server's own; another one is refused (409)",
    )
    replace: bool = Field(default=False, description="replace an existing shared prompt of that id")
    description: str = Field(default="", max_length=2000)
    metadata: Metadata = Field(
        default_factory=dict, description="free JSON: at most 8 levels, 16 KiB, finite numbers"
    )

    @model_validator(mode="after")
    def _one_source(self) -> SharedPromptCreate:
        if (self.blob is None) == (self.prompt is None):
            raise ValueError("give either blob (base64 safetensors) or id and prompt ([L, d])")
        if self.blob is not None and (self.id is not None or self.backbone is not None):
            raise ValueError("id and backbone come from the blob; give them only with prompt")
        return self


class SharedPromptInfo(BaseModel):
    id: str
    version: int
    length: int
    dim: int
    backbone: str
    description: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    created: str = ""
    updated: str = ""
    blob: str | None = Field(default=None, description="base64 blob (with include_blob=true)")


class SharedPromptList(BaseModel):
    shared_prompts: list[SharedPromptInfo]


class TaskBody(BaseModel):
    """A task's factors — ``u`` [L, r] and ``v`` [r, d] as JSON numbers (rank one: also flat,
    ``u`` [L] and ``v`` [d]), or ``factors`` as a base64 task blob — plus its description,
    metadata and default generation parameters."""

    model_config = STRICT

    shared: str | None = Field(
        default=None, description="shared prompt id (taken from the blob if absent)"
    )
    u: Matrix | None = Field(
        default=None, description="[L, r] task column factors (rank one: also a flat [L])"
    )
    v: Matrix | None = Field(
        default=None, description="[r, d] task row factors (rank one: also a flat [d])"
    )
    factors: str | None = Field(
        default=None, min_length=1, description="base64 safetensors task blob"
    )
    description: str = Field(default="", max_length=2000)
    metadata: Metadata = Field(
        default_factory=dict, description="free JSON: at most 8 levels, 16 KiB, finite numbers"
    )
    parameters: GenerationParameters | None = Field(default=None, description="default parameters")

    @field_validator("u", mode="before")
    @classmethod
    def _flat_u(cls, value: Any) -> Any:
        """A flat u [L] is the column [L, 1] (one matrix type: errors name u.i.j, once)."""
        return [[x] for x in value] if _is_flat(value) else value

    @field_validator("v", mode="before")
    @classmethod
    def _flat_v(cls, value: Any) -> Any:
        """A flat v [d] is the row [1, d]."""
        return [value] if _is_flat(value) else value

    @model_validator(mode="after")
    def _one_source(self) -> TaskBody:
        has_uv = self.u is not None or self.v is not None
        if has_uv and self.factors is not None:
            raise ValueError("give either u and v, or factors, not both")
        if not has_uv and self.factors is None:
            raise ValueError("give the task's factors: u and v, or factors (base64 blob)")
        if has_uv and (self.u is None or self.v is None):
            raise ValueError("u and v must be given together")
        if has_uv and self.shared is None:
            raise ValueError("shared is required with u and v")
        return self


class TaskCreate(TaskBody):
    name: str = Field(default=..., description="task name: ^[a-z0-9][a-z0-9._-]{0,63}$")


class TaskReplace(TaskBody):
    """The body of ``PUT /v1/tasks/{name}``: the POST body, ``name`` optional (it must then
    be the URL's). ``description``, ``metadata`` and ``parameters`` left out keep the
    previous version's values; given ones replace them (``"parameters": {}`` clears)."""

    name: str | None = Field(default=None, description="must equal the name in the URL")


class TaskInfo(BaseModel):
    name: str
    shared: str
    version: int
    rank: int
    length: int
    dim: int
    description: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)
    created: str = ""
    updated: str = ""
    u: Matrix | None = None
    v: Matrix | None = None
    factors: str | None = None


class TaskVersion(BaseModel):
    """One version of a task, as its history remembers it (not its factors)."""

    version: int
    written: str = Field(description="when this version was written (UTC)")
    shared: str
    rank: int
    length: int
    description: str = ""
    fine_tuning_job: str | None = Field(default=None, description="the job that wrote it")


class TaskVersions(BaseModel):
    name: str
    versions: list[TaskVersion] = Field(description="the current version first, then older ones")
    kept: int = Field(description="earlier versions a task remembers at most")


MAX_BATCH_TASKS = 1000


class TaskBatch(BaseModel):
    """The body of ``POST /v1/tasks:batch``: up to 1,000 task creations, each exactly the body
    of ``POST /v1/tasks``."""

    model_config = STRICT

    tasks: list[TaskCreate] = Field(
        default=..., min_length=1, max_length=MAX_BATCH_TASKS, description="tasks to create"
    )


class TaskBatchItem(BaseModel):
    """One task of a batch: ``status`` is what ``POST /v1/tasks`` would have answered for it
    (201 with ``task``, or the error status with ``error``)."""

    name: str
    status: int
    task: TaskInfo | None = None
    error: ErrorDetail | None = None


class TaskBatchResult(BaseModel):
    results: list[TaskBatchItem] = Field(description="one per task, in the request's order")
    created: int = Field(description="tasks created")
    failed: int = Field(description="tasks refused (each with its error)")


class TaskPage(BaseModel):
    tasks: list[TaskInfo]
    total: int
    offset: int
    limit: int
    next_offset: int | None


# --- generation ---------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    model_config = STRICT

    inputs: str | list[str] = Field(
        default=..., description="one input, or a list (one request each)"
    )
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)
    stream: bool = Field(default=False, description="server-sent events, one per generated piece")

    @model_validator(mode="after")
    def _inputs(self) -> GenerateRequest:
        if isinstance(self.inputs, list) and not 1 <= len(self.inputs) <= MAX_BATCH_INPUTS:
            raise ValueError(f"inputs: give 1 to {MAX_BATCH_INPUTS} inputs")
        if self.stream and isinstance(self.inputs, list) and len(self.inputs) > 1:
            raise ValueError("stream: streaming takes a single input")
        return self

    @property
    def input_list(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class Output(BaseModel):
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class TokenEvent(BaseModel):
    """The data of one ``token`` event of a streamed generate (then ``done`` or ``error``)."""

    text: str = Field(description="the new text (may be empty while a character is incomplete)")
    token_ids: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    task: str
    version: int
    texts: list[str]
    outputs: list[Output]
    usage: Usage
