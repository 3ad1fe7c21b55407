"""Request bodies, built once for the sync and the async client.

Tensors and arrays are accepted wherever a matrix is: anything with ``.tolist()`` (torch,
numpy) is converted without this module importing either.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any


def as_lists(x: Any) -> Any:
    """JSON numbers from a tensor / array (``.detach().cpu().tolist()``) or nested lists."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def as_base64(blob: bytes | str) -> str:
    return blob if isinstance(blob, str) else base64.b64encode(blob).decode("ascii")


def _optional(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def shared_prompt_body(
    *,
    id: str | None = None,
    prompt: Any = None,
    blob: bytes | str | None = None,
    backbone: str | None = None,
    description: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    replace: bool | None = None,
) -> dict[str, Any]:
    """``blob`` (safetensors bytes or base64), or ``id`` + ``prompt`` [L, d]."""
    if (blob is None) == (prompt is None):
        raise ValueError("give either blob or prompt (with id)")
    if prompt is not None and not id:
        raise ValueError("a shared prompt given as prompt needs its id")
    return _optional(
        id=id,
        prompt=as_lists(prompt) if prompt is not None else None,
        blob=as_base64(blob) if blob is not None else None,
        backbone=backbone,
        description=description,
        metadata=dict(metadata) if metadata is not None else None,
        replace=replace,
    )


def task_body(
    *,
    shared: str | None = None,
    u: Any = None,
    v: Any = None,
    factors: bytes | str | None = None,
    description: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``u`` [L, r] + ``v`` [r, d] (+ ``shared``), or ``factors`` (a task blob)."""
    return _optional(
        shared=shared,
        u=as_lists(u) if u is not None else None,
        v=as_lists(v) if v is not None else None,
        factors=as_base64(factors) if factors is not None else None,
        description=description,
        metadata=dict(metadata) if metadata is not None else None,
        parameters=dict(parameters) if parameters is not None else None,
    )


def generate_body(
    inputs: str | list[str], parameters: Mapping[str, Any], stream: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": inputs, "parameters": _optional(**parameters)}
    if stream:
        body["stream"] = True
    return body
