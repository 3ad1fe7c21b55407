"""The fine-tuning job state machine: pure functions over a job document (a JSON dict).

Both backends (Redis, the embedded directory) apply these same functions inside their atomic
read-modify-write, so the rules live in one place::

    queued ──claim──▶ running ──begin_result──▶ registering ──finish──▶ succeeded | failed
      ▲                 │  └─cancel──▶ cancelled        (cancel of queued: cancelled too)
      └──lease expired──┘  (after max_attempts expiries: failed, with the reason)

Exactly once: a worker's result first takes the job from running to registering (public status
still ``running``; ``rankone.registering`` is true) in one atomic transition under its lease,
then the task is registered, then the job succeeds. Cancel and result are ordered by that one
transition: a cancel that came first makes ``begin_result`` fail (409, nothing registered); a
result that came first makes the cancel fail (409: the job is registering, it ends succeeded
or failed). Registration is idempotent by job id, so a lease that runs out while registering
(a crashed server) requeues the job and its next attempt finds the task already there.

A claim hands out a fresh random lease token; renewing the lease, posting events and finishing
need that token, so a worker whose lease expired (and whose job went to another worker) is
refused (409) instead of overwriting the newer attempt.

Every transition returns the new document and the events it adds to the job's event log.
Keys starting with ``_`` are internal (the lease token) and never leave the server.
"""

from __future__ import annotations

import copy
import secrets
from typing import Any

Job = dict[str, Any]
Event = dict[str, Any]

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class JobStateError(RuntimeError):
    """The job is not in a state that allows this (→ 409)."""


class LeaseLostError(JobStateError):
    """The caller's lease token is not the job's current one (expired, reclaimed, cancelled)."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def event(
    now: float, message: str, *, level: str = "info", data: dict[str, Any] | None = None
) -> Event:
    """One entry of a job's event log, in OpenAI's ``fine_tuning.job.event`` shape."""
    return {
        "id": new_id("ftevent"),
        "object": "fine_tuning.job.event",
        "created_at": int(now),
        "level": level,
        "message": message,
        "type": "metrics" if data else "message",
        "data": data or {},
    }


def public(job: Job) -> Job:
    """The job as clients see it: without the internal ``_`` keys."""
    return {k: v for k, v in job.items() if not k.startswith("_")}


def _state(job: Job) -> dict[str, Any]:
    return job["rankone"]  # type: ignore[no-any-return]


def claim(job: Job, now: float, *, worker: str, lease_s: float) -> tuple[Job, list[Event]]:
    """Hand a queued job to ``worker`` under a new lease."""
    if job["status"] != "queued":
        raise JobStateError(f"job {job['id']} is {job['status']}, not queued")
    job = copy.deepcopy(job)
    state = _state(job)
    state["attempts"] = int(state.get("attempts", 0)) + 1
    state["worker"] = worker
    # each attempt gets the job's time limit; the lease never runs past it (plus one lease
    # length for the worker to report), so a hung worker that still renews is stopped too
    state["deadline_at"] = now + float(state["timeout_s"])
    state["lease_s"] = lease_s
    state["lease_expires_at"] = min(now + lease_s, state["deadline_at"] + lease_s)
    state.setdefault("started_at", int(now))
    job["_lease_token"] = secrets.token_urlsafe(24)
    job["status"] = "running"
    msg = f"attempt {state['attempts']} of {state['max_attempts']} started by worker {worker}"
    return job, [event(now, msg)]


def check_lease(job: Job, token: str) -> None:
    if job["status"] != "running" or not secrets.compare_digest(
        str(job.get("_lease_token", "")), token
    ):
        raise LeaseLostError(
            f"job {job['id']} is {job['status']} and this lease is no longer valid "
            "(it expired and the job was handed out again, or the job was cancelled); "
            "stop working on it"
        )


def begin_result(job: Job, token: str, now: float) -> tuple[Job, list[Event]]:
    """The worker's result arrived under a valid lease: from now on only it may end the job
    (the lease gets a full length more, so registering is never cut short by the reaper)."""
    check_lease(job, token)
    if _state(job).get("registering"):
        raise JobStateError(f"job {job['id']} is already registering a result")
    job = copy.deepcopy(job)
    state = _state(job)
    state["registering"] = True
    state["lease_expires_at"] = now + float(state["lease_s"])
    return job, []


def renew(job: Job, token: str, now: float) -> tuple[Job, list[Event]]:
    """Extend the lease by the length it was claimed with (never past the time limit)."""
    check_lease(job, token)
    job = copy.deepcopy(job)
    state = _state(job)
    lease_s = float(state["lease_s"])
    state["lease_expires_at"] = min(now + lease_s, float(state["deadline_at"]) + lease_s)
    return job, []


def expired(job: Job, now: float) -> bool:
    return job["status"] == "running" and float(_state(job)["lease_expires_at"]) < now


def expire(job: Job, now: float) -> tuple[Job, list[Event]]:
    """A running job whose lease ran out: back to the queue, or failed after max_attempts."""
    if not expired(job, now):
        raise JobStateError(f"job {job['id']}'s lease has not expired")
    job = copy.deepcopy(job)
    state = _state(job)
    worker, attempts, limit = (
        state.get("worker"),
        int(state["attempts"]),
        int(state["max_attempts"]),
    )
    job.pop("_lease_token", None)
    state["lease_expires_at"] = None
    state["worker"] = None
    state.pop("registering", None)
    if now >= float(state["deadline_at"]):
        reason = f"the job ran past its time limit of {float(state['timeout_s']):g} s"
        job.update(status="failed", finished_at=int(now))
        job["error"] = {"code": "time_limit", "message": reason, "param": None}
        return job, [event(now, reason, level="error")]
    if attempts >= limit:
        reason = (
            f"worker {worker} stopped renewing its lease (attempt {attempts} of {limit}); "
            "no attempts left"
        )
        job["status"] = "failed"
        job["finished_at"] = int(now)
        job["error"] = {"code": "lease_expired", "message": reason, "param": None}
        return job, [event(now, reason, level="error")]
    job["status"] = "queued"
    msg = f"worker {worker} stopped renewing its lease (attempt {attempts} of {limit}); requeued"
    return job, [event(now, msg, level="warn")]


def succeed(
    job: Job, token: str, now: float, *, task: str, version: int, metrics: dict[str, Any]
) -> tuple[Job, list[Event]]:
    check_lease(job, token)
    job = copy.deepcopy(job)
    job.pop("_lease_token", None)
    state = _state(job)
    state.pop("registering", None)
    state.update(lease_expires_at=None, task_version=version, metrics=metrics)
    job.update(status="succeeded", finished_at=int(now), fine_tuned_model=task)
    job["trained_tokens"] = metrics.get("trained_tokens")
    msg = f"task {task!r} version {version} registered; the job succeeded"
    # The final figures on the validation examples (measured after the last step whatever
    # eval_every is), so the event log always ends with them.
    # A searching job registers its winner at its best step (that step's loss is final); its
    # events count the steps of all candidates together (search_steps), as the chart does.
    data = {
        name: next(metrics[k] for k in keys if isinstance(metrics.get(k), int | float))
        for name, keys in (
            ("step", ("search_steps", "steps")),
            ("valid_loss", ("final_val_loss", "best_val_loss")),
            ("valid_accuracy", ("valid_accuracy",)),
        )
        if any(isinstance(metrics.get(k), int | float) for k in keys)
    }
    figures = ", ".join(
        f"{name.replace('_', ' ')} {data[name]:.4g}"
        for name in ("valid_loss", "valid_accuracy")
        if name in data
    )
    return job, [event(now, f"{msg}: {figures}" if figures else msg, data=data)]


def fail(job: Job, token: str, now: float, *, code: str, message: str) -> tuple[Job, list[Event]]:
    check_lease(job, token)
    job = copy.deepcopy(job)
    job.pop("_lease_token", None)
    _state(job)["lease_expires_at"] = None
    _state(job).pop("registering", None)
    job.update(status="failed", finished_at=int(now))
    job["error"] = {"code": code, "message": message, "param": None}
    return job, [event(now, f"failed: {message}", level="error")]


def cancel(job: Job, now: float) -> tuple[Job, list[Event]]:
    if job["status"] in TERMINAL:
        raise JobStateError(f"job {job['id']} is already {job['status']}; it cannot be cancelled")
    if _state(job).get("registering"):
        raise JobStateError(
            f"job {job['id']} is registering its result and can no longer be cancelled; "
            "it ends succeeded or failed"
        )
    job = copy.deepcopy(job)
    job.pop("_lease_token", None)
    _state(job)["lease_expires_at"] = None
    job.update(status="cancelled", finished_at=int(now))
    return job, [event(now, "the job was cancelled")]
