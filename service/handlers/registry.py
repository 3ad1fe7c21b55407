"""The registry handler: validate uploads against the backbone, then write through the store.

Everything is checked before the store is touched, so a bad upload never replaces a good
version: bad base64 / blob / shape / NaN → 422, wrong backbone → 409, unknown shared → 422.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch

from prompts.artifacts import (
    SharedPrompt,
    TaskFactors,
    check_backbone,
    check_name,
    check_task_fits,
    decode_shared,
    decode_task,
    from_base64,
    to_base64,
    validate_shared,
    validate_task,
)
from prompts.backbone import Backbone
from prompts.compose import compose_prompt
from prompts.errors import ArtifactError
from service.auth import Caller
from service.protocol.generate import (
    SharedPromptCreate,
    SharedPromptInfo,
    TaskBody,
    TaskInfo,
    TaskPage,
    TaskReplace,
    TaskVersion,
    TaskVersions,
)
from service.settings import Settings
from service.store.base import ConflictError, NotFoundError, Record
from service.store.factor_store import MAX_PAGE

# Fields of a task body that PUT keeps from the previous version when the body leaves them out.
_KEPT_ON_REPLACE = ("description", "metadata", "parameters")
# Earlier versions a task record remembers (a summary each, not their factors), and the
# characters of each one's description kept: a record's history stays a few KiB.
MAX_HISTORY = 20
HISTORY_DESCRIPTION_CHARS = 200


def _matrix(name: str, rows: list[Any]) -> torch.Tensor:
    """A [n, m] float tensor from JSON rows (flat rank-one factors are made 2-D by the schema)."""
    try:
        t = torch.tensor(rows, dtype=torch.float32)
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{name} must be a rectangular matrix of numbers: {e}") from None
    if t.dim() != 2:
        raise ArtifactError(f"{name} must be 2-D, got shape {list(t.shape)}")
    return t


def _header(blob: bytes) -> dict[str, Any]:
    size = int.from_bytes(blob[:8], "little")
    header: dict[str, Any] = json.loads(blob[8 : 8 + size])
    return header


def _shapes(blob: bytes) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, without reading the tensors."""
    return {k: v["shape"] for k, v in _header(blob).items() if k != "__metadata__"}


def _check_shapes(tf: TaskFactors, sp: SharedPrompt) -> None:
    """One clear line when JSON factors do not fit: what u and v must be for ``sp``."""
    r = tf.rank
    if tf.length != sp.length or tf.dim != sp.dim or tf.v.shape[0] != r:
        raise ArtifactError(
            f"task {tf.name!r}: u {list(tf.u.shape)} and v {list(tf.v.shape)} do not fit shared "
            f"prompt {sp.id!r}: expected u [L, r] = [{sp.length}, {r}] and v [r, d] = "
            f"[{r}, {sp.dim}] (rank one may also be flat lists of {sp.length} and {sp.dim} numbers)"
        )


def shared_info(record: Record) -> SharedPromptInfo:
    length, dim = _shapes(record.blob)["prompt"]
    return SharedPromptInfo(
        id=record.name,
        version=record.version,
        length=length,
        dim=dim,
        # seeded records keep their fingerprint in the blob only
        backbone=str(
            record.meta.get("backbone")
            or _header(record.blob).get("__metadata__", {}).get("backbone", "")
        ),
        description=str(record.meta.get("description", "")),
        metadata=dict(record.meta.get("metadata", {})),
        created=record.created,
        updated=record.updated,
    )


def version_of(record: Record) -> TaskVersion:
    """A summary of the version ``record`` holds (what the version history lists)."""
    length, rank = _shapes(record.blob)["u"]
    metadata = record.meta.get("metadata") or {}
    job = metadata.get("fine_tuning_job") if isinstance(metadata, dict) else None
    return TaskVersion(
        version=record.version,
        written=record.updated,
        shared=record.shared,
        rank=rank,
        length=length,
        description=str(record.meta.get("description", "")),
        fine_tuning_job=job if isinstance(job, str) else None,
    )


def task_info(record: Record, factors: TaskFactors | None = None) -> TaskInfo:
    shapes = _shapes(record.blob)
    length, rank = shapes["u"]
    dim = shapes["v"][1]
    info = TaskInfo(
        name=record.name,
        shared=record.shared,
        version=record.version,
        rank=rank,
        length=length,
        dim=dim,
        description=str(record.meta.get("description", "")),
        metadata=dict(record.meta.get("metadata", {})),
        parameters=dict(record.meta.get("parameters", {})),
        created=record.created,
        updated=record.updated,
    )
    if factors is not None:
        info.u = factors.u.float().tolist()
        info.v = factors.v.float().tolist()
        info.factors = to_base64(record.blob)
    return info


# A composed prompt row may be at most this many times the largest input-embedding row
# (L2 norms). Trained prompts sit within a small multiple of the token embeddings; a row a
# thousand times longer than any token the backbone has seen is garbage to it, and past this
# the half-precision range (65504) is near for typical embedding norms.
PROMPT_NORM_FACTOR = 1000.0


def prompt_norm_bound(backbone: Backbone) -> float:
    """``PROMPT_NORM_FACTOR`` × the largest row norm of the backbone's input embeddings."""
    model: Any = backbone.model
    weight = model.get_input_embeddings().weight  # [V, d]
    with torch.no_grad():
        largest = float(weight.float().norm(dim=-1).max())
    return PROMPT_NORM_FACTOR * largest


def check_composed(tf: TaskFactors, prompt: torch.Tensor, bound: float, dtype: torch.dtype) -> None:
    """The task prompt ``P ⊙ (U @ V)`` [L, d] must be finite (in the model's dtype too) and its
    rows no longer than ``bound``: factors that are each finite can still overflow together."""
    with torch.no_grad():
        composed = compose_prompt(
            prompt.float(), tf.u.float().to(prompt.device), tf.v.float().to(prompt.device)
        )
        finite = bool(torch.isfinite(composed).all()) and bool(
            torch.isfinite(composed.to(dtype)).all()
        )
        largest = float(composed.norm(dim=-1).max()) if finite else math.inf
    if not finite or largest > bound:
        shown = "not finite" if not finite else f"{largest:.4g}"
        raise ArtifactError(
            f"task {tf.name!r}: the composed prompt P ⊙ (u @ v) has a row norm of {shown}; "
            f"this backbone accepts at most {bound:.4g} ({PROMPT_NORM_FACTOR:g} × its largest "
            "input-embedding norm): scale u and v down"
        )


class RegistryHandler:
    def __init__(self, store: Any, backbone: Backbone, settings: Settings) -> None:
        self.store = store
        self.backbone = backbone
        self.settings = settings
        self.prompt_norm_bound = prompt_norm_bound(backbone)

    async def register_shared(
        self,
        body: SharedPromptCreate,
        *,
        expected_id: str | None = None,
        caller: Caller | None = None,
    ) -> tuple[SharedPromptInfo, bool]:
        sp = self._shared_from(body)
        if caller is not None:
            caller.check(sp.id, "shared prompt")
        if expected_id is not None and sp.id != expected_id:
            raise ArtifactError(f"the body's id is {sp.id!r}, but the URL says {expected_id!r}")
        if sp.dim != self.backbone.dim:
            raise ArtifactError(
                f"shared prompt {sp.id!r} has width d={sp.dim}, but the backbone's "
                f"embedding width is {self.backbone.dim}"
            )
        if sp.length > self.settings.max_prompt_length:
            raise ArtifactError(
                f"shared prompt {sp.id!r} has length {sp.length}, over the limit "
                f"{self.settings.max_prompt_length}"
            )
        meta = {"description": body.description, "metadata": body.metadata, "backbone": sp.backbone}
        try:
            record = await self.store.register_shared(sp, meta, replace=body.replace)
        except ConflictError as e:
            if body.replace or "already exists" not in str(e):
                raise
            raise ConflictError(
                f"shared prompt {sp.id!r} already exists: replace it with "
                f'PUT /v1/shared-prompts/{sp.id} (or "replace": true)'
            ) from None
        return shared_info(record), record.version == 1

    def _shared_from(self, body: SharedPromptCreate) -> SharedPrompt:
        fp = self.backbone.fingerprint
        if body.blob is not None:
            return decode_shared(from_base64(body.blob), backbone=fp)
        assert body.prompt is not None
        if body.id is None:
            raise ArtifactError("id is required with prompt: the shared prompt's id")
        sp = SharedPrompt(
            id=check_name(body.id, "shared prompt id"),
            prompt=_matrix("prompt", body.prompt),
            backbone=body.backbone or fp,
        )
        validate_shared(sp)
        check_backbone(sp.backbone, fp, f"shared prompt {sp.id!r}")
        return sp

    async def get_shared(self, shared_id: str, *, include_blob: bool = False) -> SharedPromptInfo:
        check_name(shared_id, "shared prompt id")
        record, _ = await self.store.get_shared(shared_id)
        info = shared_info(record)
        if include_blob:
            info.blob = to_base64(record.blob)
        return info

    async def list_shared(self) -> list[SharedPromptInfo]:
        return [shared_info(r) for r in await self.store.list_shared()]

    async def _factors(self, name: str, body: TaskBody) -> tuple[TaskFactors, dict[str, Any]]:
        check_name(name, "task name")
        fp = self.backbone.fingerprint
        if body.factors is not None:
            tf = decode_task(
                from_base64(body.factors), backbone=fp, max_rank=self.settings.max_rank
            )
            if body.shared is not None and body.shared != tf.shared:
                raise ArtifactError(
                    f"the blob's shared prompt is {tf.shared!r}, but the request "
                    f"says {body.shared!r}"
                )
            tf = dataclasses.replace(tf, name=name)
        else:
            assert body.u is not None and body.v is not None and body.shared is not None
            tf = TaskFactors(
                name=name,
                shared=check_name(body.shared, "shared prompt id"),
                u=_matrix("u", body.u),
                v=_matrix("v", body.v),
                backbone=fp,
            )
        try:
            _, sp = await self.store.get_shared(tf.shared)
        except NotFoundError:
            raise ArtifactError(
                f"unknown shared prompt {tf.shared!r}: register it first with "
                "POST /v1/shared-prompts"
            ) from None
        if body.factors is None:
            _check_shapes(tf, sp)
        validate_task(tf, max_rank=self.settings.max_rank)
        check_task_fits(tf, sp)
        check_composed(tf, sp.prompt, self.prompt_norm_bound, self.backbone.dtype)
        meta = {
            "description": body.description,
            "metadata": body.metadata,
            "parameters": body.parameters.model_dump(exclude_none=True) if body.parameters else {},
        }
        return tf, meta

    async def create_task(self, name: str, body: TaskBody) -> TaskInfo:
        tf, meta = await self._factors(name, body)
        try:
            return task_info(await self.store.create_task(tf, meta))
        except ConflictError as e:
            if "already exists" not in str(e):
                raise
            raise ConflictError(
                f"task {name!r} already exists: replace it (a new version) with "
                f"PUT /v1/tasks/{name}, same body without the name"
            ) from None

    async def replace_task(self, name: str, body: TaskReplace) -> TaskInfo:
        """A new version of ``name``; description, metadata and parameters the body leaves
        out are kept from the previous version."""
        if body.name is not None and body.name != name:
            raise ArtifactError(f"the body's name is {body.name!r}, but the URL says {name!r}")
        tf, meta = await self._factors(name, body)
        try:
            record, _ = await self.store.get_task(name)
        except NotFoundError:
            raise NotFoundError(f"no task named {name!r} to replace") from None
        kept = [f for f in _KEPT_ON_REPLACE if f not in body.model_fields_set]
        meta.update({f: record.meta[f] for f in kept if f in record.meta})
        # the version being replaced joins the history; two replaces racing may each keep
        # only the version both read (the versions' numbers themselves stay atomic)
        replaced = version_of(record)
        replaced.description = replaced.description[:HISTORY_DESCRIPTION_CHARS]
        earlier = [replaced.model_dump(), *record.meta.get("history", [])]
        meta["history"] = earlier[:MAX_HISTORY]
        return task_info(await self.store.replace_task(tf, meta))

    async def task_versions(self, name: str) -> TaskVersions:
        """The current version and up to ``MAX_HISTORY`` earlier ones, newest first."""
        record, _ = await self.store.get_task(check_name(name, "task name"))
        earlier = [TaskVersion.model_validate(v) for v in record.meta.get("history", [])]
        return TaskVersions(name=name, versions=[version_of(record), *earlier], kept=MAX_HISTORY)

    async def delete_task(self, name: str) -> None:
        await self.store.delete_task(check_name(name, "task name"))

    async def get_task(self, name: str, *, include_factors: bool = False) -> TaskInfo:
        record, tf = await self.store.get_task(check_name(name, "task name"))
        return task_info(record, tf if include_factors else None)

    async def list_tasks(
        self, offset: int, limit: int, *, allowed: Callable[[str], bool] | None = None
    ) -> TaskPage:
        """A page of tasks; with ``allowed`` (a scoped key's filter), a page of those it allows.

        A filtered listing walks the whole index (the store pages by position, not by pattern):
        fine for thousands of tasks, a cost to know of at 100,000.
        """
        if allowed is None:
            page = await self.store.list_tasks(offset, limit)
            records, total, next_offset = page.records, page.total, page.next_offset
        else:
            matching = [r async for r in self._all_records() if allowed(r.name)]
            records, total = matching[offset : offset + limit], len(matching)
            next_offset = offset + limit if offset + limit < total else None
        return TaskPage(
            tasks=[task_info(r) for r in records],
            total=total,
            offset=offset,
            limit=limit,
            next_offset=next_offset,
        )

    async def _all_records(self) -> AsyncIterator[Record]:
        offset: int | None = 0
        while offset is not None:
            page = await self.store.list_tasks(offset, MAX_PAGE)
            for record in page.records:
                yield record
            offset = page.next_offset
