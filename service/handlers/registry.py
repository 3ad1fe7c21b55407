"""The registry handler: turn request bodies into artifacts and write them through the store.

The checks of a write (names, rank, finite values, backbone fingerprint, fit to the shared
prompt, the composed rows' norm bound) are the store's write gate
(``FactorStore._gate_task``), which every writer passes: this handler, seeding and fine-tuning
results alike. A refused write changes nothing: bad base64 / blob / shape / NaN → 422, wrong
backbone → 409, unknown shared → 422.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from prompts.artifacts import (
    SharedPrompt,
    TaskFactors,
    blob_metadata,
    blob_shapes,
    check_name,
    from_base64,
    parse_shared,
    parse_task,
    to_base64,
)
from prompts.backbone import Backbone
from prompts.errors import ArtifactError
from service.auth import Caller
from service.errors import ApiError
from service.protocol.generate import (
    SharedPromptCreate,
    SharedPromptInfo,
    TaskBody,
    TaskCreate,
    TaskInfo,
    TaskPage,
    TaskReplace,
    TaskVersion,
    TaskVersions,
)
from service.protocol.text import readable
from service.settings import Settings
from service.store.base import ConflictError, NotFoundError, Record, VersionChangedError

# A batch item refused by one of these gets its own error; anything else (the store being
# unreachable above all) fails the whole batch.
ITEM_ERRORS = (ApiError, ArtifactError, NotFoundError, ConflictError, ValidationError)

# Fields of a task body that PUT keeps from the previous version when the body leaves them out.
_KEPT_ON_REPLACE = ("description", "metadata", "parameters")
# Earlier versions a task record remembers (a summary each, not their factors), and the
# characters of each one's description kept: a record's history stays a few KiB.
MAX_HISTORY = 20
HISTORY_DESCRIPTION_CHARS = 200
# Reads and compare-and-set writes a replace tries before it answers 409 (each lost race means
# another replace of the same task was written).
REPLACE_ATTEMPTS = 8


def _matrix(name: str, rows: list[Any]) -> torch.Tensor:
    """A [n, m] float tensor from JSON rows (flat rank-one factors are made 2-D by the schema)."""
    try:
        t = torch.tensor(rows, dtype=torch.float32)
    except (ValueError, TypeError) as e:
        raise ArtifactError(f"{name} must be a rectangular matrix of numbers: {e}") from None
    if t.dim() != 2:
        raise ArtifactError(f"{name} must be 2-D, got shape {list(t.shape)}")
    return t


def shared_info(record: Record) -> SharedPromptInfo:
    length, dim = blob_shapes(record.blob)["prompt"]
    return SharedPromptInfo(
        id=record.name,
        version=record.version,
        length=length,
        dim=dim,
        # seeded records keep their fingerprint in the blob only
        backbone=str(record.meta.get("backbone") or blob_metadata(record.blob).get("backbone", "")),
        description=readable(str(record.meta.get("description", ""))),
        metadata=readable(dict(record.meta.get("metadata", {}))),
        created=record.created,
        updated=record.updated,
    )


def version_of(record: Record) -> TaskVersion:
    """A summary of the version ``record`` holds (what the version history lists)."""
    length, rank = blob_shapes(record.blob)["u"]
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
    shapes = blob_shapes(record.blob)
    length, rank = shapes["u"]
    dim = shapes["v"][1]
    info = TaskInfo(
        name=record.name,
        shared=record.shared,
        version=record.version,
        rank=rank,
        length=length,
        dim=dim,
        # readable: a record stored behind the API never makes a listing fail
        description=readable(str(record.meta.get("description", ""))),
        metadata=readable(dict(record.meta.get("metadata", {}))),
        parameters=readable(dict(record.meta.get("parameters", {}))),
        created=record.created,
        updated=record.updated,
    )
    if factors is not None:
        info.u = factors.u.float().tolist()
        info.v = factors.v.float().tolist()
        info.factors = to_base64(record.blob)
    return info


def _check_round_trip(meta: dict[str, Any]) -> None:
    """Nothing is stored that its response cannot carry back: the task's text goes through
    the response model's JSON encoding before the store is touched."""
    try:
        TaskInfo(name="-", shared="-", version=1, rank=1, length=1, dim=1, **meta).model_dump_json()
    except (ValueError, PydanticSerializationError) as e:
        raise ArtifactError(f"the task's description, metadata or parameters: {e}") from None


class RegistryHandler:
    def __init__(self, store: Any, backbone: Backbone, settings: Settings) -> None:
        self.store = store
        self.backbone = backbone
        self.settings = settings

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
        if body.blob is not None:
            return parse_shared(from_base64(body.blob))
        assert body.prompt is not None
        if body.id is None:
            raise ArtifactError("id is required with prompt: the shared prompt's id")
        return SharedPrompt(
            id=check_name(body.id, "shared prompt id"),
            prompt=_matrix("prompt", body.prompt),
            backbone=body.backbone or self.backbone.fingerprint,
        )

    async def get_shared(self, shared_id: str, *, include_blob: bool = False) -> SharedPromptInfo:
        check_name(shared_id, "shared prompt id")
        record, _ = await self.store.get_shared(shared_id)
        info = shared_info(record)
        if include_blob:
            info.blob = to_base64(record.blob)
        return info

    async def list_shared(self) -> list[SharedPromptInfo]:
        return [shared_info(r) for r in await self.store.list_shared()]

    def _factors(self, name: str, body: TaskBody) -> tuple[TaskFactors, dict[str, Any]]:
        """The task artifact a body describes (a blob, or JSON ``u``/``v``) and its meta."""
        if body.factors is not None:
            tf = parse_task(from_base64(body.factors))
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
                shared=body.shared,
                u=_matrix("u", body.u),
                v=_matrix("v", body.v),
                backbone=self.backbone.fingerprint,
            )
        meta = {
            "description": body.description,
            "metadata": body.metadata,
            "parameters": body.parameters.model_dump(exclude_none=True) if body.parameters else {},
        }
        _check_round_trip(meta)
        return tf, meta

    async def create_task(self, name: str, body: TaskBody) -> TaskInfo:
        tf, meta = self._factors(name, body)
        try:
            return task_info(await self.store.create_task(tf, meta))
        except ConflictError as e:
            if "already exists" not in str(e):
                raise
            raise ConflictError(
                f"task {name!r} already exists: replace it (a new version) with "
                f"PUT /v1/tasks/{name}, same body without the name"
            ) from None

    async def create_tasks(
        self, bodies: list[TaskCreate], *, caller: Caller | None = None
    ) -> list[tuple[str, TaskInfo | Exception]]:
        """``POST /v1/tasks:batch``: each task gets exactly the checks and the write of
        ``create_task``, and its own outcome (the TaskInfo, or the error ``POST /v1/tasks``
        would have answered), so one bad task does not hold back the others. Not
        all-or-nothing: a client re-sends the refused ones (created ones then answer 409)."""
        outcomes: list[tuple[str, TaskInfo | Exception] | None] = [None] * len(bodies)
        prepared: list[tuple[int, TaskFactors, dict[str, Any]]] = []
        for i, body in enumerate(bodies):
            try:
                if caller is not None:
                    caller.check(body.name)
                tf, meta = self._factors(body.name, body)
            except ITEM_ERRORS as e:
                outcomes[i] = (body.name, e)
                continue
            prepared.append((i, tf, meta))
        written = await self.store.create_tasks([(tf, meta) for _, tf, meta in prepared])
        for (i, tf, _), outcome in zip(prepared, written, strict=True):
            if isinstance(outcome, ConflictError) and "already exists" in str(outcome):
                outcome = ConflictError(
                    f"task {tf.name!r} already exists: replace it (a new version) with "
                    f"PUT /v1/tasks/{tf.name}"
                )
            outcomes[i] = (tf.name, task_info(outcome) if isinstance(outcome, Record) else outcome)
        return [o for o in outcomes if o is not None]

    async def replace_task(self, name: str, body: TaskReplace) -> TaskInfo:
        """A new version of ``name``; description, metadata and parameters the body leaves
        out are kept from the previous version."""
        if body.name is not None and body.name != name:
            raise ArtifactError(f"the body's name is {body.name!r}, but the URL says {name!r}")
        tf, body_meta = self._factors(name, body)
        kept = [f for f in _KEPT_ON_REPLACE if f not in body.model_fields_set]
        # The new record's meta derives from the one it replaces (the kept fields, and the
        # history the replaced version joins), so the write is a compare-and-set on the version
        # read: a replace that loses a race reads again, and no version drops out of a history.
        for _ in range(REPLACE_ATTEMPTS):
            try:
                record = await self.store.get_task_record(name)
            except NotFoundError:
                raise NotFoundError(f"no task named {name!r} to replace") from None
            meta = {**body_meta, **{f: record.meta[f] for f in kept if f in record.meta}}
            replaced = version_of(record)
            replaced.description = replaced.description[:HISTORY_DESCRIPTION_CHARS]
            meta["history"] = [replaced.model_dump(), *record.meta.get("history", [])][:MAX_HISTORY]
            try:
                written = await self.store.replace_task(tf, meta, expected_version=record.version)
            except VersionChangedError:
                continue
            return task_info(written)
        raise ConflictError(
            f"task {name!r} was replaced {REPLACE_ATTEMPTS} times while this replace was being "
            "written: send it again"
        )

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
        self,
        offset: int,
        limit: int,
        *,
        patterns: Sequence[str] | None = None,
        contains: str | None = None,
    ) -> TaskPage:
        """A page of tasks; with ``patterns`` (a scoped key's), a page of those matching one;
        with ``contains``, of those whose name contains it.

        A scoped listing reads the name index's range under each pattern's literal prefix
        (``team-a-*``: the names starting with ``team-a-``), not every task; a search reads
        the names (not the records) of its range, then the page's records.
        """
        if patterns is None and contains is None:
            page = await self.store.list_tasks(offset, limit)
        else:
            page = await self.store.list_tasks_matching(
                patterns if patterns is not None else ["*"], offset, limit, contains=contains
            )
        return TaskPage(
            tasks=[task_info(r) for r in page.records],
            total=page.total,
            offset=offset,
            limit=limit,
            next_offset=page.next_offset,
        )

    async def all_tasks(
        self,
        *,
        allowed: Callable[[str], bool] | None = None,
        patterns: Sequence[str] | None = None,
    ) -> list[TaskInfo]:
        """Every task (that ``allowed`` lets through), in name order; with ``patterns`` (a
        scoped key's) only the name index's ranges under them are read."""
        return [
            task_info(r)
            async for r in self.store.iter_tasks(patterns)
            if allowed is None or allowed(r.name)
        ]
