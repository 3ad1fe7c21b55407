"""OpenAI-compatible routes (client key): ``/v1/completions`` and ``/v1/models``.

``model`` is the task name; the official ``openai`` client works unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from service.api.errors import to_response
from service.api.responses import GENERATION, KEYED, errors, streaming
from service.deps import ClientCaller, GenerationDep, RegistryDep, until_disconnected
from service.engine.base import StreamDelta
from service.handlers.generation import close_stream, completion_id, outputs
from service.protocol.openai import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from service.store.factor_store import MAX_PAGE

router = APIRouter(prefix="/v1", tags=["openai"])


def _reason(engine_reason: str | None) -> Literal["stop", "length"] | None:
    if engine_reason is None:
        return None
    return "length" if engine_reason == "length" else "stop"


@router.post("/completions", response_model=CompletionResponse, responses=streaming(*GENERATION))
async def completions(
    body: CompletionRequest, handler: GenerationDep, caller: ClientCaller, request: Request
) -> CompletionResponse | EventSourceResponse:
    """OpenAI completions; ``model`` is the task name. ``"stream": true`` answers SSE chunks
    ending with ``data: [DONE]``."""
    prepared = await handler.prepare(caller.check(body.model), body.prompts, body.parameters())
    created = int(time.time())
    cid = completion_id()
    if body.stream:
        first, stream = await handler.open_stream(prepared.requests[0])
        return EventSourceResponse(_chunks(cid, created, body.model, first, stream), ping=15)
    results = await handler.run(prepared, until_disconnected(request))
    outs, usage = outputs(results)
    choices = [
        CompletionChoice(text=o.text, index=i, finish_reason=_reason(o.finish_reason))
        for i, o in enumerate(outs)
    ]  # type: ignore[arg-type]
    return CompletionResponse(
        id=cid, created=created, model=body.model, choices=choices, usage=usage
    )


async def _chunks(
    cid: str, created: int, model: str, first: StreamDelta, stream: AsyncIterator[StreamDelta]
) -> AsyncIterator[dict[str, str]]:
    def chunk(text: str, reason: str | None) -> dict[str, str]:
        body = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
        }
        return {"data": json.dumps(body)}

    delta: StreamDelta | None = first
    try:
        while delta is not None:
            if delta.result is not None:
                yield chunk(delta.text, _reason(delta.result.finish_reason))
                break
            if delta.text:
                yield chunk(delta.text, None)
            delta = await anext(stream, None)
    except Exception as exc:  # the status is already sent: report the error as a chunk
        yield {"data": bytes(to_response(exc).body).decode()}
    finally:
        await close_stream(stream)
    yield {"data": "[DONE]"}


@router.get("/models", responses=errors(*KEYED))
async def models(registry: RegistryDep, caller: ClientCaller) -> ModelList:
    """The base model (its id, then its alias ``base``) and the tasks this key may use, as
    OpenAI models; a task's ``parent`` is the base model."""
    base = registry.store.base_model
    cards = [ModelCard(id=n, created=0) for n in registry.store.base_names if caller.allows(n)]
    offset: int | None = 0
    while offset is not None:
        page = await registry.list_tasks(offset, MAX_PAGE)
        cards += [
            ModelCard(id=t.name, created=_epoch(t.created), parent=base or None)
            for t in page.tasks
            if caller.allows(t.name)
        ]
        offset = page.next_offset
    return ModelList(data=cards)


def _epoch(stamp: str) -> int:
    try:
        return int(time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone)
    except (ValueError, OverflowError):
        return 0
