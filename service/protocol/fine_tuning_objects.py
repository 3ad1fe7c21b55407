"""The objects the files and fine-tuning routes answer with (OpenAI's ``file`` and
``fine_tuning.job`` shapes, rankone's extensions under ``rankone``): the response models of
those routes, so the OpenAPI document states them and every answer is checked against them.

Job and file documents are stored as JSON dicts; these models read them. The ``rankone``
objects allow fields beyond the ones named here (a job records what its method chose), so a
document written by a newer server still reads.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Open = ConfigDict(extra="allow")


class FileInfo(BaseModel):
    model_config = Open

    format: Literal["text", "chat"]
    examples: int
    scope: list[str] | None = Field(description="the uploading key's scope (None: unscoped)")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None
    rankone: FileInfo


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobState(BaseModel):
    """rankone's own view of a job: its task, budget, attempts and lease."""

    model_config = Open

    task: str
    mode: str
    steps: int
    attempts: int
    max_attempts: int
    worker: str | None = None
    lease_expires_at: float | None = None
    task_version: int | None = None


class FineTuningJob(BaseModel):
    model_config = Open

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    organization_id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    training_file: str
    validation_file: str | None = None
    result_files: list[str] = Field(default_factory=list)
    trained_tokens: int | None = None
    seed: int
    user_provided_suffix: str | None = None
    error: JobError | None = None
    estimated_finish: int | None = None
    integrations: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    rankone: JobState


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] = Field(default_factory=dict)


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


# --- the worker protocol ----------------------------------------------------------------------


class Claim(BaseModel):
    """A job handed to a worker: the job, its lease and the shared prompt to adapt."""

    job: FineTuningJob
    lease_token: str
    lease_s: float
    lease_expires_at: float
    shared_prompt: str = Field(description="base64 safetensors shared-prompt blob")


class Lease(BaseModel):
    status: str
    lease_expires_at: float | None
