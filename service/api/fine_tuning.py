"""OpenAI-compatible fine-tuning routes (admin key), and the worker protocol beside them.

Clients: create / list / get / cancel jobs and read their events. Workers (``rankone
worker``): claim a job under a lease, renew it, post progress, post the result or a failure.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from service.api.responses import BODY, KEYED, errors
from service.auth import Caller
from service.deps import AdminCaller, FineTuningDep, WorkersDep
from service.errors import ApiError
from service.protocol.fine_tuning import (
    ClaimRequest,
    EventsPost,
    FailurePost,
    JobCreate,
    LeaseRequest,
    ResultPost,
)
from service.protocol.fine_tuning_objects import Claim, EventList, FineTuningJob, JobList, Lease

router = APIRouter(
    prefix="/v1/fine_tuning", tags=["fine-tuning"], responses=errors(*KEYED, *BODY, 404, 409)
)
Limit = Annotated[int, Query(ge=1, le=1000)]


def worker_key(caller: Caller) -> None:
    """A worker registers tasks of any name: it needs an unscoped admin key."""
    if caller.scoped:
        raise ApiError(403, "forbidden", "workers need an unscoped admin key; this one is scoped")


@router.post("/jobs")
async def create_job(body: JobCreate, handler: FineTuningDep, caller: AdminCaller) -> FineTuningJob:
    return await handler.create_job(body, caller)


@router.get("/jobs")
async def list_jobs(
    handler: FineTuningDep, caller: AdminCaller, after: str | None = None, limit: Limit = 20
) -> JobList:
    return await handler.list_jobs(after, limit, caller)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, handler: FineTuningDep, caller: AdminCaller) -> FineTuningJob:
    return await handler.get_job(job_id, caller)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, handler: FineTuningDep, caller: AdminCaller) -> FineTuningJob:
    return await handler.cancel_job(job_id, caller)


@router.get("/jobs/{job_id}/events")
async def list_events(
    job_id: str,
    handler: FineTuningDep,
    caller: AdminCaller,
    after: str | None = None,
    limit: Limit = 20,
) -> EventList:
    return await handler.list_events(job_id, after, limit, caller)


# --- the worker protocol ----------------------------------------------------------------------


@router.post("/claims", response_model=Claim, responses={204: {"description": "no job is queued"}})
async def claim(body: ClaimRequest, handler: WorkersDep, caller: AdminCaller) -> Any:
    worker_key(caller)
    claimed = await handler.claim(body)
    return Response(status_code=204) if claimed is None else claimed


@router.post("/jobs/{job_id}/lease")
async def renew_lease(
    job_id: str, body: LeaseRequest, handler: WorkersDep, caller: AdminCaller
) -> Lease:
    worker_key(caller)
    return await handler.renew(job_id, body.lease_token)


@router.post("/jobs/{job_id}/progress", status_code=204)
async def post_progress(
    job_id: str, body: EventsPost, handler: WorkersDep, caller: AdminCaller
) -> Response:
    worker_key(caller)
    await handler.post_events(job_id, body)
    return Response(status_code=204)


@router.post("/jobs/{job_id}/result")
async def post_result(
    job_id: str, body: ResultPost, handler: WorkersDep, caller: AdminCaller
) -> FineTuningJob:
    worker_key(caller)
    return await handler.complete(job_id, body)


@router.post("/jobs/{job_id}/failure")
async def post_failure(
    job_id: str, body: FailurePost, handler: WorkersDep, caller: AdminCaller
) -> FineTuningJob:
    worker_key(caller)
    return await handler.fail(job_id, body)
