"""OpenAI-compatible file routes (admin key): upload, list, get, content, delete.

A scoped admin key sees only the files uploaded with a key of the same scope.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Response, UploadFile

from service.api.responses import BODY, KEYED, errors
from service.deps import AdminCaller, FilesDep
from service.protocol.fine_tuning_objects import FileDeleted, FileList, FileObject

router = APIRouter(prefix="/v1", tags=["fine-tuning"], responses=errors(*KEYED, *BODY, 404, 409))


@router.post("/files")
async def upload_file(
    file: UploadFile, handler: FilesDep, caller: AdminCaller, purpose: Annotated[str, Form()]
) -> FileObject:
    content = await file.read(handler.limits.max_bytes + 1)
    return await handler.upload_file(
        file.filename or "upload.jsonl", purpose, content, scope=caller.patterns
    )


@router.get("/files")
async def list_files(
    handler: FilesDep, caller: AdminCaller, purpose: str | None = None
) -> FileList:
    return await handler.list_files(purpose, scope=caller.patterns)


@router.get("/files/{file_id}")
async def get_file(file_id: str, handler: FilesDep, caller: AdminCaller) -> FileObject:
    return await handler.get_file(file_id, scope=caller.patterns)


@router.get(
    "/files/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}}},
)
async def file_content(file_id: str, handler: FilesDep, caller: AdminCaller) -> Response:
    content = await handler.file_content(file_id, scope=caller.patterns)
    return Response(content, media_type="application/jsonl")


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, handler: FilesDep, caller: AdminCaller) -> FileDeleted:
    return await handler.delete_file(file_id, scope=caller.patterns)
