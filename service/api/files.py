"""OpenAI-compatible file routes (admin key): upload, list, get, content, delete.

A scoped admin key sees only the files uploaded with a key of the same scope.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Response, UploadFile

from service.api.responses import BODY, KEYED, errors
from service.deps import AdminCaller, FineTuningDep

router = APIRouter(prefix="/v1", tags=["fine-tuning"], responses=errors(*KEYED, *BODY, 404, 409))


@router.post("/files")
async def upload_file(
    file: UploadFile, handler: FineTuningDep, caller: AdminCaller, purpose: Annotated[str, Form()]
) -> dict[str, Any]:
    content = await file.read(handler.limits.max_bytes + 1)
    return await handler.upload_file(
        file.filename or "upload.jsonl", purpose, content, scope=caller.patterns
    )


@router.get("/files")
async def list_files(
    handler: FineTuningDep, caller: AdminCaller, purpose: str | None = None
) -> dict[str, Any]:
    return await handler.list_files(purpose, scope=caller.patterns)


@router.get("/files/{file_id}")
async def get_file(file_id: str, handler: FineTuningDep, caller: AdminCaller) -> dict[str, Any]:
    return await handler.get_file(file_id, scope=caller.patterns)


@router.get(
    "/files/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}}},
)
async def file_content(file_id: str, handler: FineTuningDep, caller: AdminCaller) -> Response:
    content = await handler.file_content(file_id, scope=caller.patterns)
    return Response(content, media_type="application/jsonl")


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, handler: FineTuningDep, caller: AdminCaller) -> dict[str, Any]:
    return await handler.delete_file(file_id, scope=caller.patterns)
