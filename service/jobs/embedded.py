"""The embedded job backend: files and jobs in the server's data directory (no Redis).

Layout, next to the factor store's ``shared/`` and ``tasks/``::

    <dir>/fine-tuning/files/<id>.jsonl          the uploaded bytes
    <dir>/fine-tuning/files/<id>.json           its metadata: the commit point of an upload
    <dir>/fine-tuning/jobs/<id>.json            the job document
    <dir>/fine-tuning/jobs/<id>.events.jsonl    its event log, one JSON object a line

Every document is written with ``write_atomic`` (temp file + fsync + rename), so a restart
finds the old version or the new one, never half; a file's content is written before its
metadata, so content without metadata (a crash in between) is not a file and is removed on
start. An event line torn by a crash is skipped when read. Changes are serialised by one
asyncio.Lock: the directory belongs to one server process, like the embedded factor store.
Leases are deadlines on this host's clock; a job still running when the server restarts keeps
its lease and is handed out again once it expires, exactly as in Redis mode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from prompts.artifacts import write_atomic
from service.jobs.base import Change, JobBackend, check_id, suffix_taken
from service.jobs.lifecycle import TERMINAL, Event, Job, expired
from service.store.base import NotFoundError, StoreError

log = logging.getLogger(__name__)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class EmbeddedJobBackend(JobBackend):
    kind = "embedded"

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        root = Path(directory) / "fine-tuning"
        self.files_dir, self.jobs_dir = root / "files", root / "jobs"
        self._lock = asyncio.Lock()
        self._jobs: dict[str, Job] = {}  # every job, kept in memory (documents are small)

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._load)
        except OSError as e:
            raise StoreError(f"cannot use {self.files_dir.parent} for fine-tuning jobs: {e}") from e

    def _load(self) -> None:
        for folder in (self.files_dir, self.jobs_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        for content in self.files_dir.glob("*.jsonl"):
            if not content.with_suffix(".json").exists():  # crashed between the two writes
                content.unlink(missing_ok=True)
        for path in self.jobs_dir.glob("*.json"):
            try:
                job = json.loads(path.read_bytes())
            except ValueError:
                log.error("skipping unreadable job document %s", path)
                continue
            self._jobs[job["id"]] = job

    async def close(self) -> None:
        return None

    async def now(self) -> float:
        return time.time()

    # ---- files -------------------------------------------------------------------------

    def _file(self, file_id: str, suffix: str) -> Path:
        return self.files_dir / f"{check_id(file_id, 'file')}{suffix}"

    async def put_file(self, meta: dict[str, Any], content: bytes) -> None:
        def write() -> None:
            write_atomic(self._file(meta["id"], ".jsonl"), content)
            write_atomic(self._file(meta["id"], ".json"), _dumps(meta))  # commit point

        async with self._lock:
            await asyncio.to_thread(write)

    async def get_file(self, file_id: str) -> dict[str, Any]:
        path = self._file(file_id, ".json")
        try:
            return json.loads(await asyncio.to_thread(path.read_bytes))  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise NotFoundError(f"no file {file_id!r}") from None

    async def file_content(self, file_id: str) -> bytes:
        await self.get_file(file_id)
        try:
            return await asyncio.to_thread(self._file(file_id, ".jsonl").read_bytes)
        except FileNotFoundError:
            raise NotFoundError(f"no file {file_id!r}") from None

    async def list_files(self) -> list[dict[str, Any]]:
        def read() -> list[dict[str, Any]]:
            found = []
            for path in self.files_dir.glob("*.json"):
                try:
                    found.append(json.loads(path.read_bytes()))
                except (OSError, ValueError):
                    continue
            return found

        files = await asyncio.to_thread(read)
        return sorted(files, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    async def delete_file(self, file_id: str) -> None:
        async with self._lock:
            meta = self._file(file_id, ".json")
            if not meta.exists():
                raise NotFoundError(f"no file {file_id!r}")
            meta.unlink()  # commit point
            self._file(file_id, ".jsonl").unlink(missing_ok=True)

    # ---- jobs --------------------------------------------------------------------------

    def _job_path(self, job_id: str, suffix: str = ".json") -> Path:
        return self.jobs_dir / f"{check_id(job_id, 'ftjob')}{suffix}"

    def _write_job(self, job: Job, events: list[Event]) -> None:
        write_atomic(self._job_path(job["id"]), _dumps(job))
        self._append_events(job["id"], events)

    def _append_events(self, job_id: str, events: list[Event]) -> None:
        if not events:
            return
        with self._job_path(job_id, ".events.jsonl").open("ab") as f:
            f.write(b"".join(_dumps(e) + b"\n" for e in events))
            f.flush()
            os.fsync(f.fileno())

    async def put_job(self, job: Job, events: list[Event]) -> None:
        task = job["rankone"]["task"]
        async with self._lock:
            for other in self._jobs.values():
                if other["rankone"]["task"] == task and other["status"] not in TERMINAL:
                    raise suffix_taken(task, other)
            await asyncio.to_thread(self._write_job, job, events)
            self._jobs[job["id"]] = job

    async def get_job(self, job_id: str) -> Job:
        job = self._jobs.get(check_id(job_id, "ftjob"))
        if job is None:
            raise NotFoundError(f"no fine-tuning job {job_id!r}")
        return job

    async def list_jobs(self, after: str | None, limit: int) -> tuple[list[Job], bool]:
        jobs = sorted(self._jobs.values(), key=lambda j: (j["created_at"], j["id"]), reverse=True)
        if after is not None:
            ids = [j["id"] for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        return jobs[:limit], len(jobs) > limit

    async def _apply(self, job: Job, change: Change) -> Job:
        new, events = change(job, await self.now())
        await asyncio.to_thread(self._write_job, new, events)
        self._jobs[new["id"]] = new
        return new

    async def update_job(self, job_id: str, change: Change) -> Job:
        async with self._lock:
            return await self._apply(await self.get_job(job_id), change)

    async def claim_next(self, change: Change) -> Job | None:
        async with self._lock:
            queued = [j for j in self._jobs.values() if j["status"] == "queued"]
            if not queued:
                return None
            first = min(queued, key=lambda j: (j["rankone"]["queued_at"], j["id"]))
            return await self._apply(first, change)

    async def expired_jobs(self) -> list[str]:
        now = await self.now()
        return [j["id"] for j in self._jobs.values() if expired(j, now)]

    async def add_events(self, job_id: str, events: list[Event]) -> None:
        async with self._lock:
            await self.get_job(job_id)
            await asyncio.to_thread(self._append_events, job_id, events)

    async def list_events(self, job_id: str) -> list[Event]:
        path = self._job_path(job_id, ".events.jsonl")
        await self.get_job(job_id)

        def read() -> list[Event]:
            found = []
            try:
                lines = path.read_bytes().splitlines()
            except FileNotFoundError:
                return []
            for line in lines:
                try:
                    found.append(json.loads(line))
                except ValueError:  # a line torn by a crash
                    continue
            return found

        return await asyncio.to_thread(read)
