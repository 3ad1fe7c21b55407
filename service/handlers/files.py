"""The files handler: OpenAI-shaped uploads of fine-tuning examples, over a JobBackend.

An upload is validated whole (``service.jobs.validation``: JSON Lines, one example a line)
before anything is stored. Files are per scope: a scoped admin key sees only the files
uploaded with a key of the same scope; another scope's file and a missing one are the same 404.
"""

from __future__ import annotations

import time
from typing import Any

from service.errors import ApiError
from service.jobs import lifecycle
from service.jobs.base import JobBackend
from service.jobs.validation import FileLimits, validate_jsonl
from service.protocol.fine_tuning_objects import FileDeleted, FileList, FileObject
from service.protocol.text import readable
from service.store.base import NotFoundError

Scope = tuple[str, ...] | None  # an admin key's task-name patterns (None: unscoped)


def visible(meta: dict[str, Any], scope: Scope) -> bool:
    """A file is visible to unscoped keys, and to keys of the scope that uploaded it."""
    return scope is None or tuple(meta["rankone"].get("scope") or ()) == scope


class FilesHandler:
    def __init__(self, backend: JobBackend, limits: FileLimits) -> None:
        self.jobs = backend
        self.limits = limits

    async def upload_file(
        self, filename: str, purpose: str, content: bytes, *, scope: Scope = None
    ) -> FileObject:
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
        reply = FileObject.model_validate(meta)  # what is stored reads back as a reply
        await self.jobs.put_file(meta, content)
        return reply

    async def list_files(self, purpose: str | None, *, scope: Scope = None) -> FileList:
        files = await self.jobs.list_files()
        data = [
            f for f in files if (purpose is None or f["purpose"] == purpose) and visible(f, scope)
        ]
        return FileList(data=[FileObject.model_validate(readable(f)) for f in data])

    async def get_meta(self, file_id: str, *, scope: Scope = None) -> dict[str, Any]:
        """The stored metadata of a file this scope may see (NotFoundError otherwise)."""
        meta = await self.jobs.get_file(file_id)
        if not visible(meta, scope):  # another scope's file: as if it did not exist
            raise NotFoundError(f"no file {file_id!r}")
        return meta

    async def file_content(self, file_id: str, *, scope: Scope = None) -> bytes:
        await self.get_meta(file_id, scope=scope)
        return await self.jobs.file_content(file_id)

    async def get_file(self, file_id: str, *, scope: Scope = None) -> FileObject:
        return FileObject.model_validate(readable(await self.get_meta(file_id, scope=scope)))

    async def delete_file(self, file_id: str, *, scope: Scope = None) -> FileDeleted:
        await self.get_meta(file_id, scope=scope)
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
        return FileDeleted(id=file_id, deleted=True)
