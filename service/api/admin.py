"""Registry routes (admin key): shared prompts and tasks.

A scoped admin key (``KEY:team-a-*``) reads and writes only the tasks its patterns match, and
writes only the shared prompts whose id matches; every admin key may read shared prompts.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from prompts.artifacts import NAME_PATTERN
from service.api.errors import status_for
from service.api.responses import BODY, KEYED, errors
from service.core.paging import MAX_OFFSET, MAX_PAGE
from service.deps import AdminCaller, RegistryDep
from service.protocol.errors import ErrorDetail
from service.protocol.generate import (
    SharedPromptCreate,
    SharedPromptInfo,
    SharedPromptList,
    TaskBatch,
    TaskBatchItem,
    TaskBatchResult,
    TaskCreate,
    TaskInfo,
    TaskPage,
    TaskReplace,
    TaskVersions,
)

router = APIRouter(prefix="/v1", tags=["registry"])

# Names are checked by the handlers (422 invalid_name, with the rule), not by a path pattern.
Name = Annotated[str, Path(description=f"task name: {NAME_PATTERN.pattern}")]
SharedId = Annotated[str, Path(description=f"shared prompt id: {NAME_PATTERN.pattern}")]


@router.post(
    "/shared-prompts",
    status_code=201,
    response_model_exclude_none=True,
    responses=errors(*KEYED, *BODY, 409),
)
async def register_shared(
    body: SharedPromptCreate, registry: RegistryDep, caller: AdminCaller, response: Response
) -> SharedPromptInfo:
    info, created = await registry.register_shared(body, caller=caller)
    response.status_code = 201 if created else 200
    return info


@router.put(
    "/shared-prompts/{shared_id}",
    response_model_exclude_none=True,
    responses=errors(*KEYED, *BODY, 409),
)
async def replace_shared(
    shared_id: SharedId, body: SharedPromptCreate, registry: RegistryDep, caller: AdminCaller
) -> SharedPromptInfo:
    caller.check(shared_id, "shared prompt")
    own_id = {"id": shared_id} if body.prompt is not None and body.id is None else {}
    info, _ = await registry.register_shared(
        body.model_copy(update={"replace": True, **own_id}), expected_id=shared_id, caller=caller
    )
    return info


@router.get("/shared-prompts", response_model_exclude_none=True, responses=errors(*KEYED))
async def list_shared(registry: RegistryDep, caller: AdminCaller) -> SharedPromptList:
    return SharedPromptList(shared_prompts=await registry.list_shared())


class SharedQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_blob: bool = Field(False, description="also return the base64 safetensors blob")


@router.get(
    "/shared-prompts/{shared_id}",
    response_model_exclude_none=True,
    responses=errors(*KEYED, 404, 422),
)
async def get_shared(
    shared_id: SharedId,
    registry: RegistryDep,
    caller: AdminCaller,
    query: Annotated[SharedQuery, Query()],
) -> SharedPromptInfo:
    return await registry.get_shared(shared_id, include_blob=query.include_blob)


@router.post("/tasks", status_code=201, responses=errors(*KEYED, *BODY, 409))
async def create_task(body: TaskCreate, registry: RegistryDep, caller: AdminCaller) -> TaskInfo:
    caller.check(body.name)
    return await registry.create_task(body.name, body)


@router.post(
    "/tasks:batch",
    response_model_exclude_none=True,
    responses=errors(*KEYED, *BODY, 503),
)
async def create_tasks(
    body: TaskBatch, registry: RegistryDep, caller: AdminCaller
) -> TaskBatchResult:
    """Create up to 1,000 tasks in one request, each with exactly the checks of
    ``POST /v1/tasks``. Per-task results, not all-or-nothing: each item has the status that
    ``POST /v1/tasks`` would have answered for it (201 with ``task``, else the error), and
    the valid ones are written even when others are refused. The request as a whole fails
    only when its body is malformed (422 naming the item, nothing written) or the store is
    unreachable (503: some items may have been written; re-send, created ones answer 409)."""
    results = []
    for name, outcome in await registry.create_tasks(body.tasks, caller=caller):
        if isinstance(outcome, TaskInfo):
            results.append(TaskBatchItem(name=name, status=201, task=outcome))
        else:
            status, code, message, _ = status_for(outcome)
            error = ErrorDetail(code=code, message=message)
            results.append(TaskBatchItem(name=name, status=status, error=error))
    created = sum(r.status == 201 for r in results)
    return TaskBatchResult(results=results, created=created, failed=len(results) - created)


@router.put("/tasks/{name}", responses=errors(*KEYED, *BODY, 404, 409))
async def replace_task(
    name: Name, body: TaskReplace, registry: RegistryDep, caller: AdminCaller
) -> TaskInfo:
    caller.check(name)
    return await registry.replace_task(name, body)


@router.delete(
    "/tasks/{name}", status_code=204, response_class=Response, responses=errors(*KEYED, 404, 422)
)
async def delete_task(name: Name, registry: RegistryDep, caller: AdminCaller) -> Response:
    caller.check(name)
    await registry.delete_task(name)
    return Response(status_code=204)


class PageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt parameter is an error, not ignored

    offset: int = Field(0, ge=0, le=MAX_OFFSET, description="index of the first task")
    limit: int = Field(100, ge=1, le=MAX_PAGE, description="tasks per page")
    q: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="only tasks whose name contains this text (walks the whole index)",
    )


class TaskQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_factors: bool = Field(False, description="also return u, v and the base64 blob")


@router.get("/tasks", responses=errors(*KEYED, 422))
async def list_tasks(
    registry: RegistryDep, caller: AdminCaller, query: Annotated[PageQuery, Query()]
) -> TaskPage:
    return await registry.list_tasks(
        query.offset, query.limit, patterns=caller.patterns, contains=query.q
    )


@router.get("/tasks/{name}/versions", responses=errors(*KEYED, 404, 422))
async def task_versions(name: Name, registry: RegistryDep, caller: AdminCaller) -> TaskVersions:
    """The task's current version and the earlier ones it remembers, newest first."""
    caller.check(name)
    return await registry.task_versions(name)


@router.get("/tasks/{name}", response_model_exclude_none=True, responses=errors(*KEYED, 404, 422))
async def get_task(
    name: Name, registry: RegistryDep, caller: AdminCaller, query: Annotated[TaskQuery, Query()]
) -> TaskInfo:
    caller.check(name)
    return await registry.get_task(name, include_factors=query.include_factors)
