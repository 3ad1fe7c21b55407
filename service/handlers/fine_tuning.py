"""The fine-tuning jobs handler: create, list, get, cancel jobs and read their events, over a
JobBackend; and the lease reaper.

Job creation checks everything a worker would trip on (the shared prompt exists, the files
exist and are fine-tune files, the task name is valid, in the key's scope and free, the
bounds) so that a bad job is a 4xx now, not a failed job later. The worker side of a job
(claim, lease, progress, result) is ``service.handlers.workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from prompts.artifacts import check_name
from prompts.errors import ArtifactError
from service.auth import Caller
from service.errors import ApiError
from service.handlers.files import FilesHandler, Scope
from service.handlers.registry import RegistryHandler
from service.jobs import lifecycle
from service.jobs.base import JobBackend
from service.jobs.lifecycle import Job, JobStateError, LeaseLostError
from service.protocol.fine_tuning import Hyperparameters, JobCreate
from service.protocol.fine_tuning_objects import EventList, FineTuningJob, JobEvent, JobList
from service.protocol.text import readable
from service.settings import Settings
from service.store.base import NotFoundError

log = logging.getLogger("rankone.jobs")
AUTO_MIN_STEPS = 100  # n_epochs "auto": enough epochs for at least this many steps
AUTO_BATCH = 8
REAP_EVERY_S = 2.0


def state_error(e: JobStateError) -> ApiError:
    code = "lease_lost" if isinstance(e, LeaseLostError) else "invalid_state"
    return ApiError(409, code, str(e))


def _not_in_scope(job_id: str, caller: Caller) -> ApiError:
    scope = "|".join(caller.patterns or ())
    return ApiError(
        403,
        "forbidden",
        f"this API key is scoped to task names matching {scope!r}; it has no fine-tuning job "
        f"{job_id!r}",
    )


def resolve_steps(hp: Hyperparameters, examples: int, max_steps: int) -> tuple[int, int, int]:
    """(steps, batch size, epochs) of a job over ``examples`` training examples."""
    batch = hp.batch_size if isinstance(hp.batch_size, int) else min(AUTO_BATCH, examples)
    per_epoch = math.ceil(examples / batch)
    if hp.steps is not None:
        steps = hp.steps
    elif isinstance(hp.n_epochs, int):
        steps = hp.n_epochs * per_epoch
    else:
        steps = min(max_steps, max(AUTO_MIN_STEPS, per_epoch))
    if steps > max_steps:
        raise ApiError(
            422,
            "invalid_request",
            f"hyperparameters: {steps} steps exceed the server's limit of {max_steps}; "
            "lower n_epochs (or steps)",
        )
    return steps, batch, math.ceil(steps / per_epoch)


def reply(job: Job) -> FineTuningJob:
    """The job as clients see it (without the internal ``_`` keys), as its response model;
    ``readable`` so that a document stored before the client-text rule never fails a read."""
    return FineTuningJob.model_validate(readable(lifecycle.public(job)))


class FineTuningHandler:
    def __init__(
        self,
        backend: JobBackend,
        registry: RegistryHandler,
        files: FilesHandler,
        settings: Settings,
        *,
        on_queued: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.jobs = backend
        self.registry = registry
        self.files = files
        self.settings = settings
        self.on_queued = on_queued
        self._reaper: asyncio.Task[None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.jobs.start()
        self._reaper = asyncio.create_task(self._reap_forever(), name="rankone-job-reaper")
        if self.on_queued is not None and await self._has_queued():
            await self.on_queued()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await self.jobs.close()

    async def _has_queued(self) -> bool:
        jobs, more = await self.jobs.list_jobs(None, 1000)
        return more or any(j["status"] in ("queued", "running") for j in jobs)

    async def _reap_forever(self) -> None:
        """Expire leases; in embedded mode, also (re)start the worker whenever a job is queued
        or running and the worker child is gone (killed, crashed)."""
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            try:
                await self.reap()
                if self.on_queued is not None and await self._has_queued():
                    await self.on_queued()
            except Exception:
                log.exception("expiring job leases failed; retrying")

    async def reap(self) -> None:
        """Requeue (or fail) every running job whose lease ran out."""
        for job_id in await self.jobs.expired_jobs():
            with contextlib.suppress(JobStateError, NotFoundError):
                job = await self.jobs.update_job(job_id, lifecycle.expire)
                log.warning("job lease expired", extra={"job": job_id, "status": job["status"]})

    # ---- jobs --------------------------------------------------------------------------

    async def _fine_tune_file(self, file_id: str, field: str, scope: Scope) -> dict[str, Any]:
        try:
            meta = await self.files.get_meta(file_id, scope=scope)
        except NotFoundError:
            raise ApiError(
                422,
                "invalid_request",
                f"{field}: no file {file_id!r}; upload it with POST /v1/files",
            ) from None
        if meta["purpose"] != "fine-tune":
            raise ApiError(
                422, "invalid_request", f"{field}: file {file_id} is not a fine-tune file"
            )
        return meta

    async def _check_task_name(self, name: str, replace: bool, caller: Caller) -> None:
        try:
            check_name(name, "suffix (the new task's name)")
        except ArtifactError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        if self.registry.store.is_base(name):
            raise ApiError(
                422,
                "invalid_name",
                f"suffix: {name!r} names the base model and cannot be a task; choose another",
            )
        caller.check(name)  # before any lookup: the answer outside the scope is always 403
        if not replace:
            with contextlib.suppress(NotFoundError):
                await self.registry.get_task(name)
                raise ApiError(
                    409,
                    "conflict",
                    f"task {name!r} exists; choose another suffix, or set rankone.replace "
                    "to register the result as its new version",
                )

    async def create_job(self, body: JobCreate, caller: Caller) -> FineTuningJob:
        job_id = lifecycle.new_id("ftjob")
        task = body.suffix or f"{body.model}-{job_id[-8:]}"[-64:]
        await self._check_task_name(task, body.rankone.replace, caller)
        try:
            await self.registry.get_shared(body.model)
        except (NotFoundError, ArtifactError):
            raise ApiError(
                422,
                "invalid_request",
                f"model: no shared prompt {body.model!r} to adapt from; see GET /v1/shared-prompts",
            ) from None
        train = await self._fine_tune_file(body.training_file, "training_file", caller.patterns)
        if body.validation_file is not None:
            await self._fine_tune_file(body.validation_file, "validation_file", caller.patterns)
        hp = body.chosen_hyperparameters()
        uploaded = examples = train["rankone"]["examples"]
        if body.rankone.shots is not None:
            examples = min(examples, body.rankone.shots)
        steps, batch, epochs = resolve_steps(hp, examples, self.settings.finetune_max_steps)
        multiplier = (
            1.0 if isinstance(hp.learning_rate_multiplier, str) else hp.learning_rate_multiplier
        )
        now = await self.jobs.now()
        hyper = {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": multiplier}
        job: Job = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": int(now),
            "finished_at": None,
            "model": body.model,
            "fine_tuned_model": None,
            "organization_id": "rankone",
            "status": "queued",
            "hyperparameters": hyper,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            "training_file": body.training_file,
            "validation_file": body.validation_file,
            "result_files": [],
            "trained_tokens": None,
            "seed": body.seed if body.seed is not None else 0,
            "user_provided_suffix": body.suffix,
            "error": None,
            "estimated_finish": None,
            "integrations": [],
            "metadata": body.metadata,
            "rankone": {
                "task": task,
                "mode": body.rankone.mode,
                "instruction": body.instruction(),
                "shots": body.rankone.shots,
                "examples": {"uploaded": uploaded, "used": examples},
                "replace": body.rankone.replace,
                "eval_every": body.rankone.eval_every,
                "steps": steps,
                "learning_rate": multiplier * self.settings.finetune_base_lr,
                "timeout_s": self.settings.finetune_job_timeout_s,
                "attempts": 0,
                "max_attempts": self.settings.finetune_max_attempts,
                "worker": None,
                "queued_at": now,
                "lease_expires_at": None,
                "task_version": None,
            },
        }
        created = reply(job)  # what is stored reads back as a reply
        msg = f"job created: task {task!r} from shared prompt {body.model!r}, {steps} steps"
        events = [lifecycle.event(now, msg)]
        if examples < uploaded:  # said, never silent: shots draws a seeded sample of the file
            events.append(
                lifecycle.event(
                    now,
                    f"training on {examples} of the {uploaded} uploaded examples, drawn with the "
                    f"job's seed (rankone.shots={body.rankone.shots}); leave shots out to use "
                    "them all",
                    level="warn",
                )
            )
        await self.jobs.put_job(job, events)
        if self.on_queued is not None:
            await self.on_queued()
        return created

    async def _own_job(self, job_id: str, caller: Caller) -> Job:
        """The job, if this key's scope covers its task. For a scoped key an unknown id and a
        job of another scope get the same 403, which names nothing but the id it was given."""
        try:
            job = await self.jobs.get_job(job_id)
        except NotFoundError:
            if caller.scoped:
                raise _not_in_scope(job_id, caller) from None
            raise
        if not caller.allows(job["rankone"]["task"]):
            raise _not_in_scope(job_id, caller)
        return job

    async def get_job(self, job_id: str, caller: Caller) -> FineTuningJob:
        return reply(await self._own_job(job_id, caller))

    async def list_jobs(self, after: str | None, limit: int, caller: Caller) -> JobList:
        if not caller.scoped:
            jobs, more = await self.jobs.list_jobs(after, limit)
        else:  # a scoped key's jobs only: filter the whole list, then page
            every, _ = await self.jobs.list_jobs(None, 100_000)
            mine = [j for j in every if caller.allows(j["rankone"]["task"])]
            ids = [j["id"] for j in mine]
            if after is not None:
                mine = mine[ids.index(after) + 1 :] if after in ids else []
            jobs, more = mine[:limit], len(mine) > limit
        return JobList(data=[reply(j) for j in jobs], has_more=more)

    async def cancel_job(self, job_id: str, caller: Caller) -> FineTuningJob:
        await self._own_job(job_id, caller)
        try:
            return reply(await self.jobs.update_job(job_id, lifecycle.cancel))
        except JobStateError as e:
            raise state_error(e) from None

    async def list_events(
        self, job_id: str, after: str | None, limit: int, caller: Caller
    ) -> EventList:
        await self._own_job(job_id, caller)
        events = list(reversed(await self.jobs.list_events(job_id)))  # newest first, as OpenAI
        if after is not None:
            ids = [e["id"] for e in events]
            events = events[ids.index(after) + 1 :] if after in ids else []
        data = [JobEvent.model_validate(readable(e)) for e in events[:limit]]
        return EventList(data=data, has_more=len(events) > limit)
