"""The fine-tuning handler: files, jobs and the worker protocol, over a JobBackend.

Job creation checks everything a worker would trip on (the shared prompt exists, the files
exist and are fine-tune files, the task name is valid and free, the bounds) so that a bad job
is a 4xx now, not a failed job later. A worker's result is registered through the same
RegistryHandler as ``POST /v1/tasks`` (same validation; a new version when it replaces), and
idempotently by job id: the task's metadata names the job that made it, so a retried or
reclaimed job never registers a second version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prompts.artifacts import check_name, decode_shared, from_base64, to_base64
from prompts.errors import ArtifactError
from service.auth import Caller
from service.errors import ApiError
from service.handlers.registry import RegistryHandler
from service.jobs import lifecycle
from service.jobs.base import JobBackend
from service.jobs.lifecycle import Job, JobStateError, LeaseLostError
from service.jobs.validation import FileLimits, validate_jsonl
from service.protocol.fine_tuning import (
    ClaimRequest,
    EventsPost,
    FailurePost,
    Hyperparameters,
    JobCreate,
    ProgressEvent,
    ResultPost,
)
from service.protocol.generate import SharedPromptCreate, TaskBody, TaskReplace
from service.settings import Settings
from service.store.base import ConflictError, NotFoundError

log = logging.getLogger("rankone.jobs")
Scope = tuple[str, ...] | None  # an admin key's task-name patterns (None: unscoped)
AUTO_MIN_STEPS = 100  # n_epochs "auto": enough epochs for at least this many steps
AUTO_BATCH = 8
REAP_EVERY_S = 2.0


def _state_error(e: JobStateError) -> ApiError:
    code = "lease_lost" if isinstance(e, LeaseLostError) else "invalid_state"
    return ApiError(409, code, str(e))


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


def describe_progress(p: ProgressEvent) -> str:
    text = f"step {p.step}" + (f"/{p.total_steps}" if p.total_steps else "")
    parts = [
        f"{name} {value:.4f}"
        for name, value in (
            ("train loss", p.train_loss),
            ("valid loss", p.valid_loss),
            ("valid accuracy", p.valid_accuracy),
        )
        if value is not None
    ]
    return text + (": " + ", ".join(parts) if parts else "")


def visible(meta: dict[str, Any], scope: Scope) -> bool:
    """A file is visible to unscoped keys, and to keys of the scope that uploaded it."""
    return scope is None or tuple(meta["rankone"].get("scope") or ()) == scope


class FineTuningHandler:
    def __init__(
        self,
        backend: JobBackend,
        registry: RegistryHandler,
        settings: Settings,
        *,
        chat_template: bool,
        on_queued: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.jobs = backend
        self.registry = registry
        self.settings = settings
        self.limits = FileLimits(
            settings.finetune_max_file_bytes, settings.finetune_max_examples, chat_template
        )
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
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            try:
                await self.reap()
            except Exception:
                log.exception("expiring job leases failed; retrying")

    async def reap(self) -> None:
        """Requeue (or fail) every running job whose lease ran out."""
        for job_id in await self.jobs.expired_jobs():
            with contextlib.suppress(JobStateError, NotFoundError):
                job = await self.jobs.update_job(job_id, lifecycle.expire)
                log.warning("job lease expired", extra={"job": job_id, "status": job["status"]})

    # ---- files -------------------------------------------------------------------------

    async def upload_file(
        self, filename: str, purpose: str, content: bytes, *, scope: Scope = None
    ) -> dict[str, Any]:
        if purpose != "fine-tune":
            raise ApiError(
                422,
                "invalid_request",
                f"purpose: only 'fine-tune' files are accepted, got {purpose!r}",
            )
        fmt, examples = validate_jsonl(content, self.limits)
        meta = {
            "id": lifecycle.new_id("file"),
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename[:255],
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
            "rankone": {"format": fmt, "examples": examples, "scope": list(scope or []) or None},
        }
        await self.jobs.put_file(meta, content)
        return meta

    async def list_files(self, purpose: str | None, *, scope: Scope = None) -> dict[str, Any]:
        files = await self.jobs.list_files()
        data = [
            f for f in files if (purpose is None or f["purpose"] == purpose) and visible(f, scope)
        ]
        return {"object": "list", "data": data, "has_more": False}

    async def get_file(self, file_id: str, *, scope: Scope = None) -> dict[str, Any]:
        meta = await self.jobs.get_file(file_id)
        if not visible(meta, scope):  # another scope's file: as if it did not exist
            raise NotFoundError(f"no file {file_id!r}")
        return meta

    async def file_content(self, file_id: str, *, scope: Scope = None) -> bytes:
        await self.get_file(file_id, scope=scope)
        return await self.jobs.file_content(file_id)

    async def delete_file(self, file_id: str, *, scope: Scope = None) -> dict[str, Any]:
        await self.get_file(file_id, scope=scope)
        active, _ = await self.jobs.list_jobs(None, 10_000)
        for job in active:
            if job["status"] not in lifecycle.TERMINAL and file_id in (
                job["training_file"],
                job["validation_file"],
            ):
                raise ApiError(
                    409,
                    "file_in_use",
                    f"file {file_id} is used by job {job['id']} ({job['status']})",
                )
        await self.jobs.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- jobs --------------------------------------------------------------------------

    async def _fine_tune_file(self, file_id: str, field: str, scope: Scope) -> dict[str, Any]:
        try:
            meta = await self.get_file(file_id, scope=scope)
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

    async def _check_task_name(self, name: str, replace: bool) -> None:
        try:
            check_name(name, "suffix (the new task's name)")
        except ArtifactError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        if not replace:
            with contextlib.suppress(NotFoundError):
                await self.registry.get_task(name)
                raise ApiError(
                    409,
                    "conflict",
                    f"task {name!r} exists; choose another suffix, or set rankone.replace "
                    "to register the result as its new version",
                )

    async def create_job(self, body: JobCreate, caller: Caller) -> Job:
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
        job_id = lifecycle.new_id("ftjob")
        task = body.suffix or f"{body.model}-{job_id[-8:]}"[-64:]
        await self._check_task_name(task, body.rankone.replace)
        caller.check(task)
        hp = body.chosen_hyperparameters()
        examples = train["rankone"]["examples"]
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
        msg = f"job created: task {task!r} from shared prompt {body.model!r}, {steps} steps"
        await self.jobs.put_job(job, [lifecycle.event(now, msg)])
        if self.on_queued is not None:
            await self.on_queued()
        return lifecycle.public(job)

    async def _own_job(self, job_id: str, caller: Caller) -> Job:
        job = await self.jobs.get_job(job_id)
        caller.check(job["rankone"]["task"])
        return job

    async def get_job(self, job_id: str, caller: Caller) -> Job:
        return lifecycle.public(await self._own_job(job_id, caller))

    async def list_jobs(self, after: str | None, limit: int, caller: Caller) -> dict[str, Any]:
        if not caller.scoped:
            jobs, more = await self.jobs.list_jobs(after, limit)
        else:  # a scoped key's jobs only: filter the whole list, then page
            every, _ = await self.jobs.list_jobs(None, 100_000)
            mine = [j for j in every if caller.allows(j["rankone"]["task"])]
            ids = [j["id"] for j in mine]
            if after is not None:
                mine = mine[ids.index(after) + 1 :] if after in ids else []
            jobs, more = mine[:limit], len(mine) > limit
        return {"object": "list", "data": [lifecycle.public(j) for j in jobs], "has_more": more}

    async def cancel_job(self, job_id: str, caller: Caller) -> Job:
        await self._own_job(job_id, caller)
        try:
            return lifecycle.public(await self.jobs.update_job(job_id, lifecycle.cancel))
        except JobStateError as e:
            raise _state_error(e) from None

    async def list_events(
        self, job_id: str, after: str | None, limit: int, caller: Caller
    ) -> dict[str, Any]:
        await self._own_job(job_id, caller)
        events = list(reversed(await self.jobs.list_events(job_id)))  # newest first, as OpenAI
        if after is not None:
            ids = [e["id"] for e in events]
            events = events[ids.index(after) + 1 :] if after in ids else []
        return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}

    # ---- the worker protocol ------------------------------------------------------------

    async def claim(self, body: ClaimRequest) -> dict[str, Any] | None:
        fingerprint = self.registry.backbone.fingerprint
        if body.backbone is not None and body.backbone != fingerprint:
            raise ApiError(
                409,
                "backbone_mismatch",
                f"the worker's backbone {body.backbone} is not the server's {fingerprint}; "
                "start the worker with the server's model",
            )
        await self.reap()
        lease_s = body.lease_s or self.settings.finetune_lease_s

        def take(job: Job, now: float) -> tuple[Job, list[lifecycle.Event]]:
            return lifecycle.claim(job, now, worker=body.worker, lease_s=lease_s)

        job = await self.jobs.claim_next(take)
        if job is None:
            return None
        try:
            record, _ = await self.registry.store.get_shared(job["model"])
        except NotFoundError:
            await self._fail(
                job, "shared_prompt_deleted", f"shared prompt {job['model']!r} was deleted"
            )
            return None
        return {
            "job": lifecycle.public(job),
            "lease_token": job["_lease_token"],
            "lease_s": lease_s,
            "lease_expires_at": job["rankone"]["lease_expires_at"],
            "shared_prompt": to_base64(record.blob),
        }

    async def _fail(self, job: Job, code: str, message: str) -> Job:
        token = job["_lease_token"]
        return await self.jobs.update_job(
            job["id"], lambda j, now: lifecycle.fail(j, token, now, code=code, message=message)
        )

    async def renew(self, job_id: str, token: str) -> dict[str, Any]:
        try:
            job = await self.jobs.update_job(job_id, lambda j, now: lifecycle.renew(j, token, now))
        except JobStateError as e:
            raise _state_error(e) from None
        return {"status": job["status"], "lease_expires_at": job["rankone"]["lease_expires_at"]}

    async def post_events(self, job_id: str, body: EventsPost) -> None:
        try:
            lifecycle.check_lease(await self.jobs.get_job(job_id), body.lease_token)
        except JobStateError as e:
            raise _state_error(e) from None
        now = await self.jobs.now()
        events = [
            lifecycle.event(
                now,
                p.message or describe_progress(p),
                data=p.model_dump(exclude_none=True, exclude={"message"}),
            )
            for p in body.events
        ]
        await self.jobs.add_events(job_id, events)

    async def _register_shared(self, job: Job, blob: str) -> str:
        """Register the job's own shared prompt (paper mode, prompt tuning), once per job id;
        return its id."""
        body = SharedPromptCreate(
            blob=blob,
            description=f"made by fine-tuning job {job['id']}",
            metadata={"fine_tuning_job": job["id"]},
        )
        try:
            return (await self.registry.register_shared(body))[0].id
        except ConflictError:
            shared_id = decode_shared(from_base64(blob)).id
            existing = await self.registry.get_shared(shared_id)
            if existing.metadata.get("fine_tuning_job") == job["id"]:
                return shared_id  # registered by an earlier attempt of this job
            if not job["rankone"]["replace"]:
                raise ConflictError(
                    f"shared prompt {shared_id!r} exists; run the job again with "
                    "rankone.replace or another suffix"
                ) from None
        body.replace = True
        return (await self.registry.register_shared(body))[0].id

    async def _register(self, job: Job, factors: str, shared_blob: str | None = None) -> int:
        """Register the job's task (once per job id); return the registered version."""
        task, job_id = job["rankone"]["task"], job["id"]
        existing = None
        with contextlib.suppress(NotFoundError):
            existing = await self.registry.get_task(task)
        if existing is not None and existing.metadata.get("fine_tuning_job") == job_id:
            return existing.version  # registered by an earlier attempt of this job
        shared = (
            job["model"] if shared_blob is None else await self._register_shared(job, shared_blob)
        )
        fields: dict[str, Any] = {
            "shared": shared,
            "factors": factors,
            "description": f"fine-tuned from {job['training_file']} by job {job_id}",
            "metadata": {"fine_tuning_job": job_id, "training_file": job["training_file"]},
        }
        if existing is None:
            return (await self.registry.create_task(task, TaskBody(**fields))).version
        if not job["rankone"]["replace"]:
            raise ConflictError(
                f"task {task!r} was registered by someone else while the job ran; "
                "run the job again with rankone.replace or another suffix"
            )
        return (await self.registry.replace_task(task, TaskReplace(**fields))).version

    async def complete(self, job_id: str, body: ResultPost) -> Job:
        job = await self.jobs.get_job(job_id)
        try:
            lifecycle.check_lease(job, body.lease_token)
        except JobStateError as e:
            raise _state_error(e) from None
        try:
            version = await self._register(job, body.factors, body.shared_prompt)
        except (ArtifactError, ConflictError) as e:
            await self._fail(job, "registration_failed", str(e))
            raise
        task = job["rankone"]["task"]
        try:
            done = await self.jobs.update_job(
                job_id,
                lambda j, now: lifecycle.succeed(
                    j, body.lease_token, now, task=task, version=version, metrics=dict(body.metrics)
                ),
            )
        except JobStateError as e:  # the lease ran out while registering: a retry is idempotent
            raise _state_error(e) from None
        log.info("job succeeded", extra={"job": job_id, "task": task, "version": version})
        return lifecycle.public(done)

    async def fail(self, job_id: str, body: FailurePost) -> Job:
        job = await self.jobs.get_job(job_id)
        try:
            lifecycle.check_lease(job, body.lease_token)
            return lifecycle.public(await self._fail(job, body.code, body.message))
        except JobStateError as e:
            raise _state_error(e) from None
