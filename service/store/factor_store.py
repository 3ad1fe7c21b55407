"""FactorStore: the one object the HTTP layer and the engine use for prompts and factors.

Tiers: a ``FactorCache`` of decoded tensors on the model's device → a ``FactorBackend``
(Redis, shared by replicas, or the embedded directory store).

The write gate: every write — an HTTP upload, ``RANKONE_SEED_DIR`` seeding, a fine-tuning
job's result — passes ``_gate_shared`` / ``_gate_task`` once, before anything reaches the
backend, so a refused write leaves nothing behind. A task is checked against its shared prompt
as this server holds it (the cached tensor): name, rank, finite values, backbone fingerprint,
fit to [L, d], and the composed rows' norm bound (``prompts.artifacts.check_composed``).

Cache keys: ``("task", name)`` → the task's ``u``/``v`` with its version, and
``("shared", id)`` → the shared prompt, so 10,000 tasks over one ``P`` hold ``P`` once. A task
entry comes from decoding one blob, so ``u`` and ``v`` are always of the same version.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from prompts.artifacts import (
    SharedPrompt,
    TaskFactors,
    check_backbone,
    check_composed,
    check_name,
    decode_shared,
    decode_task,
    encode_shared,
    encode_task,
    load_artifact_dir,
    shared_path,
    task_path,
)
from prompts.errors import ArtifactError, InvalidNameError
from service.core.paging import MAX_OFFSET, MAX_PAGE
from service.core.tasks import ResolvedTask
from service.store.base import (
    ConflictError,
    EventHandler,
    FactorBackend,
    NotFoundError,
    Page,
    Record,
    StoreError,
    StoreEvent,
    UnknownSharedError,
    deliver,
)
from service.store.factor_cache import (
    CacheStats,
    Entry,
    FactorCache,
    SharedEntry,
    TaskEntry,
    nbytes,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
# The base model's alias: it, and the base model's own id, resolve to no prompt rows.
BASE_ALIAS = "base"
SCAN_CHUNK = 1000  # names per range read of the name index
_GLOB = "*?["


def literal_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard: every name it matches starts with it."""
    cut = min((i for i, c in enumerate(pattern) if c in _GLOB), default=len(pattern))
    return pattern[:cut]


def name_ranges(patterns: Sequence[str]) -> list[str]:
    """The literal prefixes of ``patterns``, sorted, without one that another one covers
    (so the ranges they name are disjoint, and read one after the other they are in order)."""
    ranges: list[str] = []
    for prefix in sorted({literal_prefix(p) for p in patterns}):
        if not any(prefix.startswith(kept) for kept in ranges):
            ranges.append(prefix)
    return ranges


def _check_meta(meta: dict[str, Any]) -> None:
    if not isinstance(meta, dict):
        raise ArtifactError(f"metadata must be a JSON object, got {type(meta).__name__}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"metadata is not JSON-serialisable: {e}") from e


def _check_page(offset: int, limit: int) -> None:
    if not 0 <= offset <= MAX_OFFSET or not 1 <= limit <= MAX_PAGE:
        raise ValueError(
            f"page offset must be in [0, {MAX_OFFSET}] and limit in [1, {MAX_PAGE}], got "
            f"offset={offset}, limit={limit}"
        )


class FactorStore:
    def __init__(
        self,
        backend: FactorBackend,
        *,
        backbone_fingerprint: str,
        dim: int,
        device: torch.device | str,
        dtype: torch.dtype,
        cache_bytes: int,
        max_rank: int = 64,
        max_prompt_length: int = 1024,
        prompt_norm_bound: float = math.inf,
        on_store_error: Callable[[StoreError], None] | None = None,
        base_model: str = "",
    ) -> None:
        """``prompt_norm_bound``: the longest composed prompt row a task may have
        (``prompts.backbone.prompt_norm_bound`` of the served backbone). ``base_model``: the
        backbone's served id; it and ``"base"`` name the backbone with no soft prompt, and no
        task may be registered under either."""
        self.backend = backend
        self.backbone_fingerprint = backbone_fingerprint
        self.dim = dim
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_rank = max_rank
        self.max_prompt_length = max_prompt_length
        self.prompt_norm_bound = prompt_norm_bound
        self.on_store_error = on_store_error
        self.store_errors = 0
        self.resets = 0  # 'reset' events seen (start, and every re-subscription)
        self._cache = FactorCache(cache_bytes)
        self._listeners: list[EventHandler] = []
        self.base_model = base_model
        self.base_names = (base_model, BASE_ALIAS) if base_model else ()
        self._base = ResolvedTask.without_prompt(
            base_model or BASE_ALIAS, dim, device=self.device, dtype=dtype
        )

    @property
    def kind(self) -> str:
        return self.backend.kind

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self._backend(self.backend.start(self._on_event))

    async def close(self) -> None:
        await self.backend.close()
        self._cache.clear()

    async def ping(self) -> bool:
        return await self.backend.ping()

    def add_listener(self, callback: EventHandler) -> None:
        """Call ``callback(event)`` (sync or async) after the cache has applied each event."""
        self._listeners.append(callback)

    def remove_listener(self, callback: EventHandler) -> None:
        self._listeners.remove(callback)

    def cache_stats(self) -> CacheStats:
        return self._cache.stats()

    # ---- invalidation ------------------------------------------------------------------

    async def _on_event(self, event: StoreEvent) -> None:
        if event.action == "reset":
            self.resets += 1
        # A 'put' of a version this replica already caches is its own write, applied already
        # (events arrive in write order; a delete in between would have dropped the entry).
        keep = event.version if event.action == "put" else None
        self._cache.invalidate(event.kind, event.name, keep_newer_than=keep)
        for listener in list(self._listeners):
            await deliver(listener, event)

    async def _backend(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except StoreError as e:
            self.store_errors += 1
            if self.on_store_error is not None:
                self.on_store_error(e)
            raise

    # ---- shared prompts ----------------------------------------------------------------

    def _gate_shared(self, sp: SharedPrompt) -> bytes:
        """The one check of a shared-prompt write; returns the blob to store."""
        blob = encode_shared(sp)  # validates name, provenance, finite values, shape
        self._check_shared(sp)
        return blob

    def _check_shared(self, sp: SharedPrompt) -> None:
        """What this server serves: its backbone, its width d, its length limit."""
        check_backbone(sp.backbone, self.backbone_fingerprint, f"shared prompt {sp.id!r}")
        if sp.dim != self.dim:
            raise ArtifactError(
                f"shared prompt {sp.id!r} has width d={sp.dim}, but this backbone's embedding "
                f"width is {self.dim}: it was made for another model"
            )
        if sp.length > self.max_prompt_length:
            raise ArtifactError(
                f"shared prompt {sp.id!r} has L={sp.length} rows, more than this server's limit "
                f"of {self.max_prompt_length}"
            )

    async def register_shared(
        self, sp: SharedPrompt, meta: dict[str, Any], *, replace: bool = False
    ) -> Record:
        """Create a shared prompt (ConflictError if it exists), or with ``replace`` create or
        replace it; a replacement must keep [L, d], since registered tasks depend on it."""
        return await self._put_shared(sp, self._gate_shared(sp), meta, replace=replace)

    async def _put_shared(
        self, sp: SharedPrompt, blob: bytes, meta: dict[str, Any], *, replace: bool
    ) -> Record:
        _check_meta(meta)
        if replace:
            try:
                _, old = await self.get_shared(sp.id)
            except NotFoundError:
                old = None
            if old is not None and old.prompt.shape != sp.prompt.shape:
                raise ConflictError(
                    f"shared prompt {sp.id!r} is [L={old.length}, d={old.dim}]; a replacement "
                    f"must keep that shape (got [L={sp.length}, d={sp.dim}]), since tasks "
                    "depend on it: register it under a new id instead"
                )
        record = await self._backend(self.backend.put_shared(sp.id, blob, meta, replace=replace))
        self._cache.invalidate("shared", sp.id)
        return record

    async def get_shared(self, shared_id: str) -> tuple[Record, SharedPrompt]:
        check_name(shared_id, "shared prompt id")
        record = await self._backend(self.backend.get_shared(shared_id))
        return record, decode_shared(record.blob)

    async def list_shared(self) -> list[Record]:
        return await self._backend(self.backend.list_shared())

    async def _shared_entry(self, shared_id: str) -> SharedEntry:
        async def load() -> tuple[Entry, int]:
            record = await self._backend(self.backend.get_shared(shared_id))
            sp = decode_shared(record.blob, backbone=self.backbone_fingerprint)
            self._check_shared(sp)
            prompt = sp.prompt.to(device=self.device, dtype=self.dtype)  # [L, d]
            return SharedEntry(record.version, prompt), nbytes(prompt)

        entry = await self._cache.get_or_load(("shared", shared_id), load)
        assert isinstance(entry, SharedEntry)
        return entry

    # ---- tasks -------------------------------------------------------------------------

    def is_base(self, name: str) -> bool:
        """Whether ``name`` is the base model (its id or ``"base"``), not a task."""
        return name in self.base_names

    async def _gate_task(self, tf: TaskFactors, prompt: Tensor | None = None) -> bytes:
        """The one check of a task write; returns the blob to store.

        ``prompt`` [L, d]: the shared prompt to check against; by default the registered one,
        as this server holds it (cached).
        """
        blob = encode_task(tf, max_rank=self.max_rank)  # validates name, rank, finite values
        if self.is_base(tf.name):
            raise InvalidNameError(
                f"task name {tf.name!r} is reserved: it names the base model (the backbone "
                f"with no soft prompt, {self.base_model!r}); choose another name"
            )
        check_backbone(tf.backbone, self.backbone_fingerprint, f"task {tf.name!r}")
        if prompt is None:
            try:
                prompt = (await self._shared_entry(tf.shared)).prompt
            except NotFoundError as e:
                raise UnknownSharedError(
                    f"task {tf.name!r} refers to shared prompt {tf.shared!r}, which is not "
                    "registered: register the shared prompt first"
                ) from e
        length, dim = prompt.shape
        if tf.length != length or tf.dim != dim:
            r = tf.rank
            raise ArtifactError(
                f"task {tf.name!r}: factors u {list(tf.u.shape)} and v {list(tf.v.shape)} do not "
                f"fit shared prompt {tf.shared!r} of shape [L={length}, d={dim}]: expected "
                f"u [L, r] = [{length}, {r}] and v [r, d] = [{r}, {dim}] (at rank one, u and v "
                f"may also be flat lists of {length} and {dim} numbers)"
            )
        check_composed(tf, prompt, self.prompt_norm_bound, self.dtype)
        return blob

    async def create_task(self, tf: TaskFactors, meta: dict[str, Any]) -> Record:
        """Register a new task (ConflictError if the name exists)."""
        return await self._put_task(tf, await self._gate_task(tf), meta, create=True)

    async def create_tasks(
        self, items: Sequence[tuple[TaskFactors, dict[str, Any]]]
    ) -> list[Record | Exception]:
        """Register many new tasks: per item the checks and the write of ``create_task``, the
        writes sent together (Redis: one pipelined round trip). Per item its Record or the
        error that refused it (ArtifactError, BackboneMismatchError, UnknownSharedError,
        ConflictError); nothing of a refused item is written. A StoreError is raised for the
        whole call (the items sent before it may have been written)."""
        results: list[Record | Exception | None] = [None] * len(items)
        ready: list[tuple[int, str, bytes, str, dict[str, Any]]] = []
        for i, (tf, meta) in enumerate(items):
            try:
                blob = await self._gate_task(tf)  # the one write gate of create_task
                _check_meta(meta)
            except (ArtifactError, NotFoundError, ConflictError) as e:
                results[i] = e
                continue
            ready.append((i, tf.name, blob, tf.shared, meta))
        written = await self._backend(self.backend.put_tasks([r[1:] for r in ready]))
        for (i, name, *_), outcome in zip(ready, written, strict=True):
            if isinstance(outcome, Record):
                self._cache.invalidate("task", name)
            results[i] = outcome
        return [r for r in results if r is not None]

    async def replace_task(
        self, tf: TaskFactors, meta: dict[str, Any], *, expected_version: int | None = None
    ) -> Record:
        """Replace a task's factors (NotFoundError if absent); its version goes up by one.
        With ``expected_version``, only if the task is still at that version (else
        VersionChangedError, nothing written): a read-modify-write of the record's meta."""
        blob = await self._gate_task(tf)
        return await self._put_task(tf, blob, meta, create=False, expected_version=expected_version)

    async def _put_task(
        self,
        tf: TaskFactors,
        blob: bytes,
        meta: dict[str, Any],
        *,
        create: bool,
        expected_version: int | None = None,
    ) -> Record:
        _check_meta(meta)
        record = await self._backend(
            self.backend.put_task(
                tf.name, blob, tf.shared, meta, create=create, expected_version=expected_version
            )
        )
        self._cache.invalidate("task", tf.name)
        return record

    async def delete_task(self, name: str) -> None:
        check_name(name, "task name")
        await self._backend(self.backend.delete_task(name))
        self._cache.invalidate("task", name)

    async def get_task(self, name: str) -> tuple[Record, TaskFactors]:
        record = await self.get_task_record(name)
        return record, decode_task(record.blob, max_rank=self.max_rank)

    async def get_task_record(self, name: str) -> Record:
        """The stored record alone (its blob not decoded)."""
        check_name(name, "task name")
        return await self._backend(self.backend.get_task(name))

    async def list_tasks(self, offset: int = 0, limit: int = 100) -> Page:
        _check_page(offset, limit)
        return await self._backend(self.backend.list_tasks(offset=offset, limit=limit))

    async def matching_names(self, patterns: Sequence[str]) -> list[str]:
        """Every task name that matches one of the glob ``patterns``, in name order.

        Reads only the name index's ranges under the patterns' literal prefixes (``team-a-*``
        reads the names starting with ``team-a-``), so a namespace of 100 tasks among a million
        costs a read of 100 names. A pattern that starts with a wildcard reads every name.
        """
        found: list[str] = []
        for prefix in name_ranges(patterns):
            after: str | None = None
            while True:
                chunk = await self._backend(
                    self.backend.task_names(prefix, after=after, limit=SCAN_CHUNK)
                )
                found += [n for n in chunk if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
                if len(chunk) < SCAN_CHUNK:
                    break
                after = chunk[-1]
        return found

    async def list_tasks_matching(
        self,
        patterns: Sequence[str],
        offset: int = 0,
        limit: int = 100,
        *,
        contains: str | None = None,
    ) -> Page:
        """A page of the tasks whose names match one of ``patterns`` (a scoped key's), and
        contain ``contains`` when given (a search: names only are read to filter)."""
        _check_page(offset, limit)
        names = await self.matching_names(patterns)
        if contains is not None:
            names = [n for n in names if contains in n]
        chunk = names[offset : offset + limit]
        records = await self._backend(self.backend.get_tasks(chunk))
        end = offset + len(chunk)
        return Page(records, len(names), end if end < len(names) else None)

    async def iter_tasks(self, patterns: Sequence[str] | None = None) -> AsyncIterator[Record]:
        """Every task record (or those matching ``patterns``), in name order, read a chunk of
        names and a pipelined read of their records at a time."""
        if patterns is not None:
            names = await self.matching_names(patterns)
            for start in range(0, len(names), SCAN_CHUNK):
                for record in await self._backend(
                    self.backend.get_tasks(names[start : start + SCAN_CHUNK])
                ):
                    yield record
            return
        after: str | None = None
        while True:
            chunk = await self._backend(self.backend.task_names(after=after, limit=SCAN_CHUNK))
            for record in await self._backend(self.backend.get_tasks(chunk)):
                yield record
            if len(chunk) < SCAN_CHUNK:
                return
            after = chunk[-1]

    async def resolve(self, name: str) -> ResolvedTask:
        """The task's factors and shared prompt on the model's device: cache, else backend.

        The tensors are the cache's own (shared by every caller): read them, never modify them
        in place.
        """
        task, _ = await self.resolve_with_defaults(name)
        return task

    async def resolve_with_defaults(self, name: str) -> tuple[ResolvedTask, dict[str, Any]]:
        """``resolve(name)`` and the task's default generation parameters (its metadata's
        ``parameters``), both from the same cached record, so of the same version. The dict is
        the cache's own: never modify it. The base model's name resolves to zero prompt rows
        (L = 0) and no defaults."""
        if self.is_base(name):
            return self._base, {}

        async def load() -> tuple[Entry, int]:
            check_name(name, "task name")
            record = await self._backend(self.backend.get_task(name))
            # one blob holds u and v: they are always of the same version
            tf = decode_task(
                record.blob, backbone=self.backbone_fingerprint, max_rank=self.max_rank
            )
            u = tf.u.to(device=self.device, dtype=self.dtype)  # [L, r]
            v = tf.v.to(device=self.device, dtype=self.dtype)  # [r, d]
            parameters = dict(record.meta.get("parameters") or {})
            return TaskEntry(record.version, tf.shared, u, v, parameters), nbytes(u, v)

        entry = await self._cache.get_or_load(("task", name), load)
        assert isinstance(entry, TaskEntry)
        shared = await self._shared_entry(entry.shared_id)
        length, dim = shared.prompt.shape
        if entry.u.shape[0] != length or entry.v.shape[1] != dim:
            raise ArtifactError(
                f"task {name!r}: factors u {tuple(entry.u.shape)}, v {tuple(entry.v.shape)} do "
                f"not fit shared prompt {entry.shared_id!r} {tuple(shared.prompt.shape)}"
            )
        task = ResolvedTask(name, entry.version, entry.shared_id, shared.prompt, entry.u, entry.v)
        return task, entry.parameters

    # ---- seeding -----------------------------------------------------------------------

    async def seed_from_dir(self, path: str | Path, *, overwrite: bool = False) -> tuple[int, int]:
        """Register the trainer's artifacts under ``path``; returns (shared, tasks) written.

        Every artifact passes the write gate before anything is written, so a directory with
        one refused file seeds nothing. Records that already exist are left alone unless
        ``overwrite``.
        """
        root = Path(path)
        found = await asyncio.to_thread(load_artifact_dir, root, validate=False)
        shared: list[tuple[SharedPrompt, bytes]] = []
        tasks: list[tuple[TaskFactors, bytes]] = []
        try:
            for sp in found.shared.values():
                where = shared_path(root, sp.id)
                shared.append((sp, self._gate_shared(sp)))
            for tf in found.tasks.values():
                where = task_path(root, tf.name)
                prompt = await self._seed_prompt(tf.shared, found.shared[tf.shared], overwrite)
                tasks.append((tf, await self._gate_task(tf, prompt)))
        except ArtifactError as e:
            raise type(e)(f"{where}: {e}") from e
        n_shared = n_tasks = 0
        for sp, blob in shared:
            try:
                await self._put_shared(sp, blob, dict(sp.meta), replace=overwrite)
                n_shared += 1
            except ConflictError:
                if overwrite:
                    raise
        for tf, blob in tasks:
            try:
                if overwrite:
                    try:
                        await self._put_task(tf, blob, dict(tf.meta), create=False)
                    except NotFoundError:
                        await self._put_task(tf, blob, dict(tf.meta), create=True)
                else:
                    await self._put_task(tf, blob, dict(tf.meta), create=True)
                n_tasks += 1
            except ConflictError:
                if overwrite:
                    raise
        log.info("seeded %d shared prompts and %d tasks from %s", n_shared, n_tasks, path)
        return n_shared, n_tasks

    async def _seed_prompt(self, shared_id: str, seeded: SharedPrompt, overwrite: bool) -> Tensor:
        """The shared prompt a seeded task will compose with: the directory's, unless a
        registered one is kept (no ``overwrite``)."""
        if not overwrite:
            try:
                return (await self._shared_entry(shared_id)).prompt
            except NotFoundError:
                pass
        return seeded.prompt
