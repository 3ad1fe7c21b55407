"""What the API answers, as small dataclasses (unknown fields are kept in ``raw``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def from_json(cls: type[T], data: dict[str, Any]) -> T:
    """``cls`` from a JSON object, ignoring fields this client does not know (newer servers)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    known = {k: v for k, v in data.items() if k in names and k != "raw"}
    obj = cls(**known)
    if "raw" in names:
        object.__setattr__(obj, "raw", data)
    return obj


@dataclass
class SharedPromptInfo:
    id: str
    version: int
    length: int
    dim: int
    backbone: str
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    blob: str | None = None  # base64 safetensors, with ``include_blob=True``
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class TaskInfo:
    name: str
    shared: str
    version: int
    rank: int
    length: int
    dim: int
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    u: list[list[float]] | None = None  # [L, r], with ``include_factors=True``
    v: list[list[float]] | None = None  # [r, d]
    factors: str | None = None  # base64 safetensors task blob
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class BatchItem:
    """One task of ``tasks.create_many``: ``status`` is what ``POST /v1/tasks`` would have
    answered for it (201 with ``task``, else the error's status with ``error``)."""

    name: str
    status: int
    task: TaskInfo | None = None
    error: dict[str, str] | None = None  # {"code", "message"}

    @property
    def ok(self) -> bool:
        return self.status == 201

    @classmethod
    def parse(cls, data: dict[str, Any]) -> BatchItem:
        task = data.get("task")
        return cls(
            name=data["name"],
            status=int(data["status"]),
            task=from_json(TaskInfo, task) if task is not None else None,
            error=data.get("error"),
        )


@dataclass
class Output:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass
class Generation:
    """The answer of ``generate``: one output per input, in order."""

    task: str
    version: int
    texts: list[str]
    outputs: list[Output]
    usage: Usage

    @classmethod
    def parse(cls, data: dict[str, Any]) -> Generation:
        return cls(
            task=data["task"],
            version=data["version"],
            texts=list(data["texts"]),
            outputs=[from_json(Output, o) for o in data["outputs"]],
            usage=from_json(Usage, data["usage"]),
        )


@dataclass
class StreamEvent:
    """One event of a stream: ``token`` (new ``text``) or the final ``done`` (with ``output``)."""

    event: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    output: Output | None = None
