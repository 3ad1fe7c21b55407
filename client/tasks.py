"""The registry resources: ``client.tasks`` and ``client.shared_prompts`` (sync and async).

Each method builds its request with ``client/payloads.py`` and parses the answer into
``client/types.py``; the sync and async classes differ only by ``await``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from client.payloads import shared_prompt_body, task_body
from client.types import BatchItem, SharedPromptInfo, TaskInfo, from_json

if TYPE_CHECKING:
    from client.aio import AsyncClient
    from client.sync import Client

PAGE_SIZE = 100
BATCH_SIZE = 500  # tasks per POST /v1/tasks:batch (the server takes up to 1,000)


def batch_bodies(
    tasks: Iterable[Mapping[str, Any]], batch_size: int
) -> Iterator[list[dict[str, Any]]]:
    """``{"name", **create fields}`` mappings as request bodies, ``batch_size`` at a time."""
    if not 1 <= batch_size <= 1000:
        raise ValueError(f"batch_size must be in [1, 1000], got {batch_size}")
    chunk: list[dict[str, Any]] = []
    for t in tasks:
        fields = dict(t)
        name = fields.pop("name")
        chunk.append({"name": name, **task_body(**fields)})
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _task_path(name: str) -> str:
    return f"/v1/tasks/{quote(name, safe='')}"


def _shared_path(shared_id: str) -> str:
    return f"/v1/shared-prompts/{quote(shared_id, safe='')}"


class Tasks:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, name: str, **fields: Any) -> TaskInfo:
        """Register a new task (409 ``ConflictError`` if it exists). ``fields``: ``shared``
        + ``u`` [L, r] + ``v`` [r, d] (tensors, arrays or lists), or ``factors`` (blob bytes),
        and optional ``description``, ``metadata``, ``parameters`` (default generation ones)."""
        body = {"name": name, **task_body(**fields)}
        return from_json(TaskInfo, self._client.request_json("POST", "/v1/tasks", json=body))

    def create_many(
        self, tasks: Iterable[Mapping[str, Any]], *, batch_size: int = BATCH_SIZE
    ) -> list[BatchItem]:
        """Create many tasks through ``POST /v1/tasks:batch``, ``batch_size`` per request: each
        mapping is ``{"name": ..., **fields}`` with the fields of ``create``. Returns one
        ``BatchItem`` per task, in order: refused tasks carry their error and the others are
        created (not all-or-nothing); an ``APIError`` is raised only for a whole request."""
        items: list[BatchItem] = []
        for bodies in batch_bodies(tasks, batch_size):
            data = self._client.request_json("POST", "/v1/tasks:batch", json={"tasks": bodies})
            items += [BatchItem.parse(x) for x in data["results"]]
        return items

    def replace(self, name: str, **fields: Any) -> TaskInfo:
        """Replace a task (a new version); same ``fields`` as ``create``. What the body omits
        is reset: description, metadata and default parameters are the ones given here."""
        data = self._client.request_json("PUT", _task_path(name), json=task_body(**fields))
        return from_json(TaskInfo, data)

    def get(self, name: str, *, include_factors: bool = False) -> TaskInfo:
        params = {"include_factors": "true"} if include_factors else None
        return from_json(
            TaskInfo, self._client.request_json("GET", _task_path(name), params=params)
        )

    def delete(self, name: str) -> None:
        self._client.request("DELETE", _task_path(name))

    def list(self, *, page_size: int = PAGE_SIZE) -> Iterator[TaskInfo]:
        """Every task, fetched ``page_size`` at a time as the iteration goes."""
        offset: int | None = 0
        while offset is not None:
            page = self._client.request_json(
                "GET", "/v1/tasks", params={"offset": offset, "limit": page_size}
            )
            yield from (from_json(TaskInfo, t) for t in page["tasks"])
            offset = page.get("next_offset")


class SharedPrompts:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, **fields: Any) -> SharedPromptInfo:
        """Register a shared prompt: ``blob`` (safetensors bytes), or ``id`` + ``prompt``
        [L, d] (tensor, array or lists); ``backbone`` defaults to the server's fingerprint.
        ``replace=True`` replaces one of that id."""
        body = shared_prompt_body(**fields)
        return from_json(
            SharedPromptInfo, self._client.request_json("POST", "/v1/shared-prompts", json=body)
        )

    def replace(self, shared_id: str, **fields: Any) -> SharedPromptInfo:
        if "prompt" in fields:
            fields.setdefault("id", shared_id)
        body = shared_prompt_body(**fields)
        return from_json(
            SharedPromptInfo, self._client.request_json("PUT", _shared_path(shared_id), json=body)
        )

    def get(self, shared_id: str, *, include_blob: bool = False) -> SharedPromptInfo:
        params = {"include_blob": "true"} if include_blob else None
        return from_json(
            SharedPromptInfo,
            self._client.request_json("GET", _shared_path(shared_id), params=params),
        )

    def list(self) -> list[SharedPromptInfo]:
        data = self._client.request_json("GET", "/v1/shared-prompts")
        return [from_json(SharedPromptInfo, s) for s in data["shared_prompts"]]


class AsyncTasks:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(self, name: str, **fields: Any) -> TaskInfo:
        body = {"name": name, **task_body(**fields)}
        data = await self._client.request_json("POST", "/v1/tasks", json=body)
        return from_json(TaskInfo, data)

    async def create_many(
        self, tasks: Iterable[Mapping[str, Any]], *, batch_size: int = BATCH_SIZE
    ) -> list[BatchItem]:
        """As ``Tasks.create_many``."""
        items: list[BatchItem] = []
        for bodies in batch_bodies(tasks, batch_size):
            data = await self._client.request_json(
                "POST", "/v1/tasks:batch", json={"tasks": bodies}
            )
            items += [BatchItem.parse(x) for x in data["results"]]
        return items

    async def replace(self, name: str, **fields: Any) -> TaskInfo:
        data = await self._client.request_json("PUT", _task_path(name), json=task_body(**fields))
        return from_json(TaskInfo, data)

    async def get(self, name: str, *, include_factors: bool = False) -> TaskInfo:
        params = {"include_factors": "true"} if include_factors else None
        data = await self._client.request_json("GET", _task_path(name), params=params)
        return from_json(TaskInfo, data)

    async def delete(self, name: str) -> None:
        await self._client.request("DELETE", _task_path(name))

    async def list(self, *, page_size: int = PAGE_SIZE) -> AsyncIterator[TaskInfo]:
        offset: int | None = 0
        while offset is not None:
            page = await self._client.request_json(
                "GET", "/v1/tasks", params={"offset": offset, "limit": page_size}
            )
            for t in page["tasks"]:
                yield from_json(TaskInfo, t)
            offset = page.get("next_offset")


class AsyncSharedPrompts:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(self, **fields: Any) -> SharedPromptInfo:
        data = await self._client.request_json(
            "POST", "/v1/shared-prompts", json=shared_prompt_body(**fields)
        )
        return from_json(SharedPromptInfo, data)

    async def replace(self, shared_id: str, **fields: Any) -> SharedPromptInfo:
        if "prompt" in fields:
            fields.setdefault("id", shared_id)
        data = await self._client.request_json(
            "PUT", _shared_path(shared_id), json=shared_prompt_body(**fields)
        )
        return from_json(SharedPromptInfo, data)

    async def get(self, shared_id: str, *, include_blob: bool = False) -> SharedPromptInfo:
        params = {"include_blob": "true"} if include_blob else None
        data = await self._client.request_json("GET", _shared_path(shared_id), params=params)
        return from_json(SharedPromptInfo, data)

    async def list(self) -> list[SharedPromptInfo]:
        data = await self._client.request_json("GET", "/v1/shared-prompts")
        return [from_json(SharedPromptInfo, s) for s in data["shared_prompts"]]
