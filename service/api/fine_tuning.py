"""OpenAI-compatible fine-tuning routes (admin key), and the worker protocol beside them.

Clients: create / list / get / cancel jobs and read their events. Workers (``rankone
worker``): claim a job under a lease, renew it, post progress, post the result or a failure.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from service.deps import AdminAuth, FineTuningDep
from service.protocol.fine_tuning import (
    COMMON_ERRORS,
    ClaimRequest,
    EventsPost,
    FailurePost,
    JobCreate,
    LeaseRequest,
    ResultPost,
)

router = APIRouter(
    prefix="/v1/fine_tuning",
    dependencies=[AdminAuth],
    tags=["fine-tuning"],
    responses=COMMON_ERRORS,
)

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such job"}}
_LEASE: dict[int | str, dict[str, Any]] = {
    **_NOT_FOUND,
    409: {"description": "the lease is no longer valid (expired, reclaimed, cancelled)"},
}
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.post(
    "/jobs",
    responses={409: {"description": "the task exists"}, 422: {"description": "bad job"}},
)
async def create_job(body: JobCreate, handler: FineTuningDep) -> dict[str, Any]:
    return await handler.create_job(body)


@router.get("/jobs")
async def list_jobs(
    handler: FineTuningDep, after: str | None = None, limit: Limit = 20
) -> dict[str, Any]:
    return await handler.list_jobs(after, limit)


@router.get("/jobs/{job_id}", responses=_NOT_FOUND)
async def get_job(job_id: str, handler: FineTuningDep) -> dict[str, Any]:
    return await handler.get_job(job_id)


@router.post(
    "/jobs/{job_id}/cancel", responses={**_NOT_FOUND, 409: {"description": "already finished"}}
)
async def cancel_job(job_id: str, handler: FineTuningDep) -> dict[str, Any]:
    return await handler.cancel_job(job_id)


@router.get("/jobs/{job_id}/events", responses=_NOT_FOUND)
async def list_events(
    job_id: str, handler: FineTuningDep, after: str | None = None, limit: Limit = 20
) -> dict[str, Any]:
    return await handler.list_events(job_id, after, limit)


# --- the worker protocol ----------------------------------------------------------------------


@router.post(
    "/claims",
    responses={204: {"description": "no job is queued"}, 409: {"description": "wrong backbone"}},
)
async def claim(body: ClaimRequest, handler: FineTuningDep) -> Any:
    claimed = await handler.claim(body)
    return Response(status_code=204) if claimed is None else claimed


@router.post("/jobs/{job_id}/lease", responses=_LEASE)
async def renew_lease(job_id: str, body: LeaseRequest, handler: FineTuningDep) -> dict[str, Any]:
    return await handler.renew(job_id, body.lease_token)


@router.post("/jobs/{job_id}/progress", status_code=204, responses=_LEASE)
async def post_progress(job_id: str, body: EventsPost, handler: FineTuningDep) -> Response:
    await handler.post_events(job_id, body)
    return Response(status_code=204)


@router.post("/jobs/{job_id}/result", responses=_LEASE)
async def post_result(job_id: str, body: ResultPost, handler: FineTuningDep) -> dict[str, Any]:
    return await handler.complete(job_id, body)


@router.post("/jobs/{job_id}/failure", responses=_LEASE)
async def post_failure(job_id: str, body: FailurePost, handler: FineTuningDep) -> dict[str, Any]:
    return await handler.fail(job_id, body)
