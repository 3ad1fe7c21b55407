"""The embedded backend: the factor registry in a local directory (no Redis needed).

Layout (the directory stays a valid artifact directory for ``prompts.load_artifact_dir``)::

    <dir>/shared/<id>.safetensors       the exact artifact bytes
    <dir>/shared/<id>.record.json       version, meta, created, updated, sha256 of the blob
    <dir>/tasks/<name>.safetensors
    <dir>/tasks/<name>.record.json

Two files must change together, and rename is only atomic per file, so a write is a small
journal whose commit point is the record file:

1. the new blob is written (temp file + fsync + rename) to ``<name>.safetensors.pending``;
2. the record, naming the new blob's sha256, is written the same way: **commit point**;
3. the pending blob is renamed over ``<name>.safetensors``.

A crash before 2 leaves the old record and old blob (the pending file is discarded on the next
start); a crash after 2 leaves a record whose sha256 matches the pending blob, which start()
rolls forward and readers use directly. A reader checks the blob's sha256 against the record,
so it never pairs one version's metadata with another version's factors. A delete removes the
record first (commit point), then the blob; a blob without a record is not a record. It
leaves ``<name>.deleted.json`` with the last version, so a task created again under that name
continues at version + 1: (name, version) never names two different sets of factors.

Writes are serialised in-process by an asyncio.Lock; the directory is meant for one server
process (several replicas share Redis instead). The sorted task names are kept in memory
(read from the directory once at start), so listing and a prefix range read cost what they
return, not a walk of the directory. The store holds at most ``max_tasks`` tasks (default
100,000: two files per task in one directory, read at every start): a create past it is
refused with a clear error that points at Redis, which holds millions.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from prompts.artifacts import check_name, utc_now, write_atomic
from service.store.base import (
    ConflictError,
    EventHandler,
    FactorBackend,
    NotFoundError,
    Page,
    Record,
    StoreError,
    StoreEvent,
    StoreFullError,
    UnknownSharedError,
    VersionChangedError,
    deliver,
)

log = logging.getLogger(__name__)

Kind = Literal["shared", "task"]
_DIRS: dict[Kind, str] = {"shared": "shared", "task": "tasks"}
_BLOB = ".safetensors"
_RECORD = ".record.json"
_PENDING = ".safetensors.pending"
_DELETED = ".deleted.json"  # the last version of a deleted name
_READ_ATTEMPTS = 5  # a reader racing a writer's steps 2-3 re-reads a few times
DEFAULT_MAX_TASKS = 100_000


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EmbeddedBackend(FactorBackend):
    kind = "embedded"

    def __init__(
        self, directory: str | os.PathLike[str], *, max_tasks: int = DEFAULT_MAX_TASKS
    ) -> None:
        if max_tasks < 1:
            raise ValueError(f"max_tasks must be >= 1, got {max_tasks}")
        self.directory = Path(directory)
        self.max_tasks = max_tasks
        self._lock = asyncio.Lock()
        self._on_event: EventHandler | None = None
        self._index: list[str] = []  # every task name, sorted (read at start, kept by writes)

    # ---- paths -------------------------------------------------------------------------

    def _path(self, kind: Kind, name: str, suffix: str) -> Path:
        # check_name keeps every path inside the directory (no '/', no '..')
        return self.directory / _DIRS[kind] / f"{check_name(name, _what(kind))}{suffix}"

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, on_event: EventHandler) -> None:
        try:
            await asyncio.to_thread(self._prepare)
        except OSError as e:
            raise StoreError(
                f"cannot use {self.directory} as the embedded store: {e.strerror or e}; "
                "set the data directory to a writable path"
            ) from e
        self._on_event = on_event
        await deliver(on_event, StoreEvent("reset", "all", "", 0))

    def _prepare(self) -> None:
        for kind, sub in _DIRS.items():
            folder = self.directory / sub
            folder.mkdir(parents=True, exist_ok=True)
            for tmp in folder.glob(".*.tmp"):  # a write_atomic interrupted by a crash
                tmp.unlink(missing_ok=True)
            for pending in folder.glob(f"*{_PENDING}"):
                self._recover(kind, pending.name[: -len(_PENDING)])
        self._index = self._names("task")
        if len(self._index) > self.max_tasks:
            log.warning(
                "embedded store: %d tasks in %s, over its limit of %d: new tasks are refused "
                "until some are deleted (or use Redis)",
                len(self._index),
                self.directory,
                self.max_tasks,
            )

    def _recover(self, kind: Kind, name: str) -> None:
        """Finish a write that crashed after its commit point, or discard one that did not."""
        pending = self._path(kind, name, _PENDING)
        try:
            record = json.loads(self._path(kind, name, _RECORD).read_bytes())
        except (OSError, ValueError):
            record = None
        if record is not None and record.get("sha256") == _sha256(pending.read_bytes()):
            os.replace(pending, self._path(kind, name, _BLOB))
            log.warning("embedded store: rolled forward an interrupted write of %s %r", kind, name)
        else:
            pending.unlink(missing_ok=True)

    async def close(self) -> None:
        self._on_event = None

    async def ping(self) -> bool:
        return await asyncio.to_thread(
            lambda: all(os.access(self.directory / sub, os.W_OK) for sub in _DIRS.values())
        )

    # ---- reads -------------------------------------------------------------------------

    def _read(self, kind: Kind, name: str) -> Record:
        record_path = self._path(kind, name, _RECORD)
        for _ in range(_READ_ATTEMPTS):
            try:
                info = json.loads(record_path.read_bytes())
            except FileNotFoundError:
                raise NotFoundError(f"no {_what(kind)} named {name!r}") from None
            except ValueError as e:
                raise StoreError(
                    f"embedded store: record of {kind} {name!r} is corrupt: {e}"
                ) from e
            for suffix in (_BLOB, _PENDING):  # the pending blob, if a write is between 2 and 3
                try:
                    blob = self._path(kind, name, suffix).read_bytes()
                except FileNotFoundError:
                    continue
                if _sha256(blob) == info["sha256"]:
                    return _record(kind, name, blob, info)
        raise StoreError(
            f"embedded store: the blob of {kind} {name!r} does not match its record "
            f"(sha256 {info['sha256'][:12]}…); restore {self._path(kind, name, _BLOB)} from a backup"
        )

    async def _get(self, kind: Kind, name: str) -> Record:
        try:
            return await asyncio.to_thread(self._read, kind, name)
        except OSError as e:
            raise StoreError(f"embedded store: cannot read {kind} {name!r}: {e}") from e

    def _names(self, kind: Kind) -> list[str]:
        folder = self.directory / _DIRS[kind]
        return sorted(p.name[: -len(_RECORD)] for p in folder.glob(f"*{_RECORD}"))

    def _read_many(self, kind: Kind, names: list[str]) -> list[Record]:
        records = []
        for name in names:
            try:
                records.append(self._read(kind, name))
            except NotFoundError:  # deleted since it was listed
                continue
        return records

    async def get_shared(self, name: str) -> Record:
        return await self._get("shared", name)

    async def get_task(self, name: str) -> Record:
        return await self._get("task", name)

    async def list_shared(self) -> list[Record]:
        def run() -> list[Record]:
            return self._read_many("shared", self._names("shared"))

        try:
            return await asyncio.to_thread(run)
        except OSError as e:
            raise StoreError(f"embedded store: cannot list shared prompts: {e}") from e

    async def task_names(
        self, prefix: str = "", *, after: str | None = None, limit: int
    ) -> list[str]:
        names = self._index
        start = bisect.bisect_left(names, prefix)
        if after is not None and after >= prefix:
            start = bisect.bisect_right(names, after)
        found = []
        for name in names[start : start + limit]:
            if not name.startswith(prefix):
                break
            found.append(name)
        return found

    async def get_tasks(self, names: list[str]) -> list[Record]:
        try:
            return await asyncio.to_thread(self._read_many, "task", list(names))
        except OSError as e:
            raise StoreError(f"embedded store: cannot read tasks: {e}") from e

    async def list_tasks(self, *, offset: int = 0, limit: int = 100) -> Page:
        def run() -> Page:
            names = self._index
            chunk = names[offset : offset + limit]
            end = offset + len(chunk)
            return Page(
                records=self._read_many("task", chunk),
                total=len(names),
                next_offset=end if end < len(names) else None,
            )

        try:
            return await asyncio.to_thread(run)
        except OSError as e:
            raise StoreError(f"embedded store: cannot list tasks: {e}") from e

    # ---- writes ------------------------------------------------------------------------

    def _write(
        self,
        kind: Kind,
        name: str,
        blob: bytes,
        shared: str,
        meta: dict[str, Any],
        mode: Literal["create", "replace", "upsert"],
        expected_version: int | None = None,
    ) -> Record:
        if kind == "task" and not self._path("shared", shared, _RECORD).exists():
            raise UnknownSharedError(f"no shared prompt named {shared!r}; register it first")
        try:
            old = json.loads(self._path(kind, name, _RECORD).read_bytes())
        except FileNotFoundError:
            old = None
        if old is not None and mode == "create":
            raise ConflictError(f"{_what(kind)} {name!r} already exists; use replace to update it")
        if old is None and mode == "replace":
            raise NotFoundError(f"no {_what(kind)} named {name!r} to replace")
        if old is not None and expected_version is not None and old["version"] != expected_version:
            raise VersionChangedError(
                f"{_what(kind)} {name!r} is at version {old['version']}, not {expected_version}"
            )
        if kind == "task" and old is None and len(self._index) >= self.max_tasks:
            raise StoreFullError(
                f"the embedded store holds at most {self.max_tasks:,} tasks "
                f"(RANKONE_EMBEDDED_MAX_TASKS) and has {len(self._index):,}: delete some, or "
                "set RANKONE_REDIS_URL to use Redis, which holds millions"
            )
        now = utc_now()
        tombstone = self._path(kind, name, _DELETED)
        info = {
            "version": (_last_version(tombstone) if old is None else int(old["version"])) + 1,
            "shared": shared,
            "meta": meta,
            "created": now if old is None else old["created"],
            "updated": now,
            "sha256": _sha256(blob),
        }
        pending = self._path(kind, name, _PENDING)
        write_atomic(pending, blob)
        try:
            write_atomic(self._path(kind, name, _RECORD), json.dumps(info).encode())
        except BaseException:
            pending.unlink(missing_ok=True)
            raise
        try:
            _fsync_dir(pending.parent)  # both renames reach the disk, in this order
            os.replace(pending, self._path(kind, name, _BLOB))
            tombstone.unlink(missing_ok=True)  # the record now carries the version
            _fsync_dir(pending.parent)
        except OSError as e:  # committed: readers and the next start() use the pending blob
            log.warning("embedded store: %s %r committed, final rename failed: %s", kind, name, e)
        if kind == "task" and old is None:
            bisect.insort(self._index, name)
        return _record(kind, name, blob, info)

    async def _put(
        self,
        kind: Kind,
        name: str,
        blob: bytes,
        shared: str,
        meta: dict[str, Any],
        mode: Literal["create", "replace", "upsert"],
        expected_version: int | None = None,
    ) -> Record:
        async with self._lock:
            try:
                record = await asyncio.to_thread(
                    self._write, kind, name, blob, shared, meta, mode, expected_version
                )
            except OSError as e:
                raise StoreError(
                    f"embedded store: writing {kind} {name!r} failed, the previous version is "
                    f"kept: {e}"
                ) from e
        await self._emit(StoreEvent("put", kind, name, record.version))
        return record

    async def put_shared(
        self, name: str, blob: bytes, meta: dict[str, Any], *, replace: bool = False
    ) -> Record:
        return await self._put("shared", name, blob, name, meta, "upsert" if replace else "create")

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
        mode: Literal["create", "replace"] = "create" if create else "replace"
        return await self._put("task", name, blob, shared, meta, mode, expected_version)

    async def delete_task(self, name: str) -> None:
        def run() -> int:
            record_path = self._path("task", name, _RECORD)
            try:
                version = int(json.loads(record_path.read_bytes())["version"])
            except FileNotFoundError:
                raise NotFoundError(f"no task named {name!r}") from None
            # the name's last version survives it, so a new task of that name continues
            write_atomic(self._path("task", name, _DELETED), json.dumps(version).encode())
            record_path.unlink()  # commit point
            at = bisect.bisect_left(self._index, name)
            if at < len(self._index) and self._index[at] == name:
                del self._index[at]
            self._path("task", name, _BLOB).unlink(missing_ok=True)
            self._path("task", name, _PENDING).unlink(missing_ok=True)
            return version

        async with self._lock:
            try:
                version = await asyncio.to_thread(run)
            except OSError as e:
                raise StoreError(f"embedded store: deleting task {name!r} failed: {e}") from e
        await self._emit(StoreEvent("delete", "task", name, version))

    async def _emit(self, event: StoreEvent) -> None:
        if self._on_event is not None:
            await deliver(self._on_event, event)


def _last_version(tombstone: Path) -> int:
    try:
        return int(json.loads(tombstone.read_bytes()))
    except FileNotFoundError:
        return 0


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (a rename is only in the directory's data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _what(kind: Kind) -> str:
    return "shared prompt" if kind == "shared" else "task"


def _record(kind: Kind, name: str, blob: bytes, info: dict[str, Any]) -> Record:
    return Record(
        kind=kind,
        name=name,
        blob=blob,
        version=int(info["version"]),
        shared=str(info["shared"]),
        meta=dict(info.get("meta") or {}),
        created=str(info.get("created", "")),
        updated=str(info.get("updated", "")),
    )
