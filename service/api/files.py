"""OpenAI-compatible file routes (admin key): upload, list, get, content, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Response, UploadFile

from service.deps import AdminAuth, FineTuningDep
from service.protocol.fine_tuning import COMMON_ERRORS

router = APIRouter(
    prefix="/v1", dependencies=[AdminAuth], tags=["fine-tuning"], responses=COMMON_ERRORS
)

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such file"},
    413: {"description": "file over the size or line limit"},
    422: {"description": "malformed file (lines listed) or bad purpose"},
}


@router.post("/files", responses=_ERRORS)
async def upload_file(
    file: UploadFile, handler: FineTuningDep, purpose: Annotated[str, Form()]
) -> dict[str, Any]:
    content = await file.read(handler.limits.max_bytes + 1)
    return await handler.upload_file(file.filename or "upload.jsonl", purpose, content)


@router.get("/files")
async def list_files(handler: FineTuningDep, purpose: str | None = None) -> dict[str, Any]:
    return await handler.list_files(purpose)


@router.get("/files/{file_id}", responses=_ERRORS)
async def get_file(file_id: str, handler: FineTuningDep) -> dict[str, Any]:
    return await handler.get_file(file_id)


@router.get(
    "/files/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/jsonl": {}}}, **_ERRORS},
)
async def file_content(file_id: str, handler: FineTuningDep) -> Response:
    return Response(await handler.file_content(file_id), media_type="application/jsonl")


@router.delete("/files/{file_id}", responses={409: {"description": "used by a job"}, **_ERRORS})
async def delete_file(file_id: str, handler: FineTuningDep) -> dict[str, Any]:
    return await handler.delete_file(file_id)
