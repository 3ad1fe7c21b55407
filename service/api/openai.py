"""OpenAI-compatible routes (client key): ``/v1/completions`` and ``/v1/models``.

``model`` is the task name; the official ``openai`` client works unchanged.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from service.api.responses import (
    GENERATION,
    KEYED,
    errors,
    openai_events,
    stream_content,
    streaming,
)
from service.api.streams import event_stream
from service.deps import ClientCaller, GenerationDep, RegistryDep, until_disconnected
from service.handlers.completions import CompletionsHandler
from service.protocol.openai import (
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)

router = APIRouter(prefix="/v1", tags=["openai"])


def get_completions(generation: GenerationDep) -> CompletionsHandler:
    return CompletionsHandler(generation)


CompletionsDep = Annotated[CompletionsHandler, Depends(get_completions)]


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses=streaming(
        stream_content(openai_events(CompletionChunk), CompletionChunk), *GENERATION
    ),
)
async def completions(
    body: CompletionRequest, handler: CompletionsDep, caller: ClientCaller, request: Request
) -> CompletionResponse | EventSourceResponse:
    """OpenAI completions; ``model`` is the task name. ``"stream": true`` answers SSE chunks
    ending with ``data: [DONE]``."""
    prepared = await handler.prepare(body, caller)
    if body.stream:
        return event_stream(await handler.open_stream(body, prepared), done=True)
    return await handler.complete(body, prepared, until_disconnected(request))


@router.get("/models", responses=errors(*KEYED))
async def models(registry: RegistryDep, caller: ClientCaller) -> ModelList:
    """The base model (its id, then its alias ``base``) and the tasks this key may use, as
    OpenAI models; a task's ``parent`` is the base model."""
    base = registry.store.base_model
    cards = [ModelCard(id=n, created=0) for n in registry.store.base_names if caller.allows(n)]
    tasks = await registry.all_tasks(patterns=caller.patterns)
    cards += [ModelCard(id=t.name, created=_epoch(t.created), parent=base or None) for t in tasks]
    return ModelList(data=cards)


def _epoch(stamp: str) -> int:
    try:
        return int(time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone)
    except (ValueError, OverflowError):
        return 0
