"""Registry routes (admin key): shared prompts and tasks."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from service.deps import AdminAuth, RegistryDep
from service.protocol.generate import (
    SharedPromptCreate,
    SharedPromptInfo,
    SharedPromptList,
    TaskCreate,
    TaskInfo,
    TaskPage,
    TaskReplace,
)

router = APIRouter(prefix="/v1", dependencies=[AdminAuth], tags=["registry"])


@router.post("/shared-prompts", status_code=201, response_model_exclude_none=True)
async def register_shared(
    body: SharedPromptCreate, registry: RegistryDep, response: Response
) -> SharedPromptInfo:
    info, created = await registry.register_shared(body)
    response.status_code = 201 if created else 200
    return info


@router.put("/shared-prompts/{shared_id}", response_model_exclude_none=True)
async def replace_shared(
    shared_id: str, body: SharedPromptCreate, registry: RegistryDep
) -> SharedPromptInfo:
    own_id = {"id": shared_id} if body.prompt is not None and body.id is None else {}
    info, _ = await registry.register_shared(
        body.model_copy(update={"replace": True, **own_id}), expected_id=shared_id
    )
    return info


@router.get("/shared-prompts", response_model_exclude_none=True)
async def list_shared(registry: RegistryDep) -> SharedPromptList:
    return SharedPromptList(shared_prompts=await registry.list_shared())


@router.get("/shared-prompts/{shared_id}", response_model_exclude_none=True)
async def get_shared(
    shared_id: str, registry: RegistryDep, include_blob: bool = False
) -> SharedPromptInfo:
    return await registry.get_shared(shared_id, include_blob=include_blob)


@router.post("/tasks", status_code=201)
async def create_task(body: TaskCreate, registry: RegistryDep) -> TaskInfo:
    return await registry.create_task(body.name, body)


@router.put("/tasks/{name}")
async def replace_task(name: str, body: TaskReplace, registry: RegistryDep) -> TaskInfo:
    return await registry.replace_task(name, body)


@router.delete("/tasks/{name}", status_code=204)
async def delete_task(name: str, registry: RegistryDep) -> Response:
    await registry.delete_task(name)
    return Response(status_code=204)


@router.get("/tasks", response_model_exclude_none=True)
async def list_tasks(
    registry: RegistryDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> TaskPage:
    return await registry.list_tasks(offset, limit)


@router.get("/tasks/{name}", response_model_exclude_none=True)
async def get_task(name: str, registry: RegistryDep, include_factors: bool = False) -> TaskInfo:
    return await registry.get_task(name, include_factors=include_factors)
