"""The interface of a factor-store backend (Redis or the embedded directory store).

Backends store artifact blobs (``prompts.artifacts`` bytes) with a version per record; they
know nothing of torch devices. Writes are all-or-nothing: a reader never sees ``u`` of one
version with ``v`` of another, and a failed write leaves the previous version intact.
"""

from __future__ import annotations

import abc
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal


class StoreError(RuntimeError):
    """The backend could not be reached or failed (→ 503, counted in metrics)."""


class NotFoundError(KeyError):
    """No such task / shared prompt (→ 404)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else "not found"


class UnknownSharedError(NotFoundError):
    """A task refers to a shared prompt that is not registered (→ a 4xx on the task write)."""


class ConflictError(RuntimeError):
    """Create of a name that exists, or delete of a shared prompt still in use (→ 409)."""


class VersionChangedError(ConflictError):
    """A replace that named the version it read, when another write got there first: the
    caller reads the record again and rebuilds what it derived from it (→ 409 if it gives up)."""


class StoreFullError(ConflictError):
    """A create past the backend's documented capacity (the embedded store's task limit)."""


@dataclass(frozen=True)
class Record:
    """One stored blob: a shared prompt (kind='shared') or a task (kind='task')."""

    kind: Literal["shared", "task"]
    name: str  # task name or shared-prompt id
    blob: bytes = field(repr=False)  # the safetensors artifact
    version: int  # 1 on create, +1 on every replace (and on a create after a delete)
    shared: str  # for a task: its shared prompt id; for a shared prompt: its own id
    meta: dict[str, Any] = field(default_factory=dict)  # description, default params, ...
    created: str = ""
    updated: str = ""


@dataclass(frozen=True)
class StoreEvent:
    """Published on every write so other replicas drop stale cache entries.

    action 'reset' means: messages may have been missed (reconnect) — drop everything.
    """

    action: Literal["put", "delete", "reset"]
    kind: Literal["shared", "task", "all"]
    name: str
    version: int


EventHandler = Callable[[StoreEvent], Awaitable[None] | None]

log = logging.getLogger(__name__)


async def deliver(handler: EventHandler, event: StoreEvent) -> None:
    """Call a sync or async event handler; a failing handler is logged, never propagated,
    so one bad subscriber cannot stop invalidations reaching the others."""
    try:
        result = handler(event)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("store event handler %r failed on %s", handler, event)


@dataclass(frozen=True)
class Page:
    records: list[Record]
    total: int
    next_offset: int | None


class FactorBackend(abc.ABC):
    kind: str  # "redis" | "embedded"

    @abc.abstractmethod
    async def start(self, on_event: EventHandler) -> None:
        """Connect; deliver write events (from this and other replicas) to ``on_event``."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    @abc.abstractmethod
    async def put_shared(
        self, name: str, blob: bytes, meta: dict[str, Any], *, replace: bool = False
    ) -> Record:
        """Create (ConflictError if it exists and not ``replace``) or replace a shared prompt."""

    @abc.abstractmethod
    async def get_shared(self, name: str) -> Record: ...

    @abc.abstractmethod
    async def list_shared(self) -> list[Record]: ...

    @abc.abstractmethod
    async def put_task(
        self,
        name: str,
        blob: bytes,
        shared: str,
        meta: dict[str, Any],
        *,
        create: bool,
        expected_version: int | None = None,
    ) -> Record:
        """create=True: ConflictError if it exists. create=False: replace (NotFoundError if
        absent) with version + 1; with ``expected_version``, only if the stored version is
        still that one (VersionChangedError if not). UnknownSharedError if ``shared`` is not
        registered (checked in the same atomic step). Atomic with the index update and the
        event publish."""

    async def put_tasks(
        self, items: list[tuple[str, bytes, str, dict[str, Any]]]
    ) -> list[Record | Exception]:
        """Create many tasks, ``(name, blob, shared, meta)`` each, every one the same atomic
        write as ``put_task(create=True)``; per item its Record, or the ConflictError /
        UnknownSharedError that refused it. A StoreError (backend unreachable) is raised for
        the whole call: some of the items may then have been written."""
        results: list[Record | Exception] = []
        for name, blob, shared, meta in items:
            try:
                results.append(await self.put_task(name, blob, shared, meta, create=True))
            except (ConflictError, NotFoundError) as e:
                results.append(e)
        return results

    @abc.abstractmethod
    async def get_task(self, name: str) -> Record: ...

    @abc.abstractmethod
    async def delete_task(self, name: str) -> None:
        """Remove the record and its index entry, publish a 'delete' (NotFoundError if absent)."""

    @abc.abstractmethod
    async def list_tasks(self, *, offset: int = 0, limit: int = 100) -> Page:
        """Tasks in name order."""

    @abc.abstractmethod
    async def task_names(
        self, prefix: str = "", *, after: str | None = None, limit: int
    ) -> list[str]:
        """Up to ``limit`` task names that start with ``prefix``, in name order, each greater
        than ``after`` when given: a range read of the name index, whose cost grows with the
        names returned, not with the number of tasks."""

    @abc.abstractmethod
    async def get_tasks(self, names: list[str]) -> list[Record]:
        """The records of ``names`` (in that order) in one round trip; absent names skipped."""
