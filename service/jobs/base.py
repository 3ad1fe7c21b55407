"""The interface of a job backend: durable files and fine-tuning jobs (Redis or a directory).

A backend stores documents and knows nothing of training: every state change is a pure
function from ``service.jobs.lifecycle`` that the backend applies atomically
(``update_job``/``claim_next``) with the backend's own clock, so that every replica of a
Redis deployment agrees on when a lease expired.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable
from typing import Any

from service.jobs.lifecycle import Event, Job
from service.store.base import ConflictError, NotFoundError

# (job, now) → (new job, events to append)
Change = Callable[[Job, float], tuple[Job, list[Event]]]

_ID = re.compile(r"^(file|ftjob)-[0-9a-f]{24}$")


def suffix_taken(task: str, holder: Job) -> ConflictError:
    return ConflictError(
        f"task {task!r} is already the name of job {holder['id']} ({holder['status']}); "
        "choose another suffix, or wait for that job to end (or cancel it)"
    )


def check_id(value: str, kind: str) -> str:
    """Ids are made by the server; anything else names nothing (and never a path)."""
    if not _ID.fullmatch(value) or not value.startswith(kind + "-"):
        raise NotFoundError(f"no {'file' if kind == 'file' else 'fine-tuning job'} {value!r}")
    return value


class JobBackend(abc.ABC):
    kind: str

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def now(self) -> float:
        """Seconds since the epoch on the backend's clock (Redis TIME, or this host's)."""

    # ---- files -------------------------------------------------------------------------

    @abc.abstractmethod
    async def put_file(self, meta: dict[str, Any], content: bytes) -> None:
        """Store a validated file: content and metadata together or not at all."""

    @abc.abstractmethod
    async def get_file(self, file_id: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def file_content(self, file_id: str) -> bytes: ...

    @abc.abstractmethod
    async def list_files(self) -> list[dict[str, Any]]:
        """Newest first."""

    @abc.abstractmethod
    async def delete_file(self, file_id: str) -> None: ...

    # ---- jobs --------------------------------------------------------------------------

    @abc.abstractmethod
    async def put_job(self, job: Job, events: list[Event]) -> None:
        """Store a new job (status queued) and its first events, reserving its task name
        (``job["rankone"]["task"]``) until the job ends: ConflictError, and nothing stored,
        while another job that has not ended holds that name."""

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> Job: ...

    @abc.abstractmethod
    async def list_jobs(self, after: str | None, limit: int) -> tuple[list[Job], bool]:
        """Newest first, the page after job ``after``; and whether more follow."""

    @abc.abstractmethod
    async def update_job(self, job_id: str, change: Change) -> Job:
        """Apply ``change`` atomically (no other update interleaves); return the new job.
        Exceptions raised by ``change`` propagate and leave the job as it was."""

    @abc.abstractmethod
    async def claim_next(self, change: Change) -> Job | None:
        """Apply ``change`` (a claim) to the oldest queued job; None when none is queued."""

    @abc.abstractmethod
    async def expired_jobs(self) -> list[str]:
        """Ids of running jobs whose lease deadline has passed."""

    @abc.abstractmethod
    async def add_events(self, job_id: str, events: list[Event]) -> None: ...

    @abc.abstractmethod
    async def list_events(self, job_id: str) -> list[Event]:
        """Oldest first."""
