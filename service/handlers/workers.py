"""The worker protocol: what ``rankone worker`` calls (an unscoped admin key) to run a job —
claim it under a lease, renew the lease, post progress, post the result or a failure.

A worker's result is registered through the same RegistryHandler as ``POST /v1/tasks`` (same
validation; a new version when it replaces), exactly once: ``lifecycle.begin_result`` (one
atomic transition under the lease) orders it against a cancel, and registration is
idempotent by job id (the task's metadata names the job that made it), so a retried or
reclaimed job never registers a second version.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from prompts.artifacts import decode_shared, from_base64, to_base64
from prompts.errors import ArtifactError
from service.errors import ApiError
from service.handlers.fine_tuning import FineTuningHandler, reply, state_error
from service.jobs import lifecycle
from service.jobs.lifecycle import Job, JobStateError
from service.protocol.fine_tuning import (
    ClaimRequest,
    EventsPost,
    FailurePost,
    ProgressEvent,
    ResultPost,
)
from service.protocol.fine_tuning_objects import Claim, FineTuningJob, Lease
from service.protocol.generate import SharedPromptCreate, TaskBody, TaskReplace
from service.store.base import ConflictError, NotFoundError

log = logging.getLogger("rankone.jobs")


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


class WorkersHandler:
    def __init__(self, jobs: FineTuningHandler) -> None:
        self.fine_tuning = jobs
        self.jobs = jobs.jobs
        self.registry = jobs.registry
        self.settings = jobs.settings

    async def claim(self, body: ClaimRequest) -> Claim | None:
        fingerprint = self.registry.backbone.fingerprint
        if body.backbone is not None and body.backbone != fingerprint:
            raise ApiError(
                409,
                "backbone_mismatch",
                f"the worker's backbone {body.backbone} is not the server's {fingerprint}; "
                "start the worker with the server's model",
            )
        await self.fine_tuning.reap()  # leases run out on claims too, not only every 2 s
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
        return Claim(
            job=reply(job),
            lease_token=job["_lease_token"],
            lease_s=lease_s,
            lease_expires_at=job["rankone"]["lease_expires_at"],
            shared_prompt=to_base64(record.blob),
        )

    async def _fail(self, job: Job, code: str, message: str) -> Job:
        token = job["_lease_token"]
        return await self.jobs.update_job(
            job["id"], lambda j, now: lifecycle.fail(j, token, now, code=code, message=message)
        )

    async def renew(self, job_id: str, token: str) -> Lease:
        try:
            job = await self.jobs.update_job(job_id, lambda j, now: lifecycle.renew(j, token, now))
        except JobStateError as e:
            raise state_error(e) from None
        return Lease(status=job["status"], lease_expires_at=job["rankone"]["lease_expires_at"])

    async def post_events(self, job_id: str, body: EventsPost) -> None:
        try:
            lifecycle.check_lease(await self.jobs.get_job(job_id), body.lease_token)
        except JobStateError as e:
            raise state_error(e) from None
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

    async def complete(self, job_id: str, body: ResultPost) -> FineTuningJob:
        """Register the result exactly once: ``begin_result`` (one atomic transition under the
        lease) orders it against a cancel; only then is the task written."""
        token = body.lease_token
        try:
            job = await self.jobs.update_job(
                job_id, lambda j, now: lifecycle.begin_result(j, token, now)
            )
        except JobStateError as e:
            raise state_error(e) from None
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
            raise state_error(e) from None
        log.info("job succeeded", extra={"job": job_id, "task": task, "version": version})
        return reply(done)

    async def fail(self, job_id: str, body: FailurePost) -> FineTuningJob:
        job = await self.jobs.get_job(job_id)
        try:
            lifecycle.check_lease(job, body.lease_token)
            return reply(await self._fail(job, body.code, body.message))
        except JobStateError as e:
            raise state_error(e) from None
