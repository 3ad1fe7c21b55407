"""``POST /v1/chat/completions`` (client key), OpenAI-compatible: ``model`` is the task name.

The conversation is rendered by the backbone's chat template and the task's soft prompt goes in
front of it (prompts/chat.py); the official ``openai`` client works unchanged, streaming too.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from service.api.errors import to_response
from service.api.responses import GENERATION, openai_events, stream_content, streaming
from service.deps import ClientCaller, GenerationDep, until_disconnected
from service.engine.base import GenerationResult, StreamDelta
from service.handlers.chat import (
    ChatHandler,
    chat_completion_id,
    finish_reason,
    merge_streams,
    usage,
)
from service.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    ChunkDelta,
)
from service.protocol.generate import Usage

router = APIRouter(prefix="/v1", tags=["openai"])


def get_chat(generation: GenerationDep) -> ChatHandler:
    return ChatHandler(generation)


ChatDep = Annotated[ChatHandler, Depends(get_chat)]


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses=streaming(
        stream_content(openai_events(ChatCompletionChunk), ChatCompletionChunk), *GENERATION
    ),
)
async def chat_completions(
    body: ChatCompletionRequest, handler: ChatDep, caller: ClientCaller, request: Request
) -> ChatCompletionResponse | EventSourceResponse:
    caller.check(body.model)
    prepared = await handler.prepare(body)
    created, cid = int(time.time()), chat_completion_id()
    if body.stream:
        streams = await handler.open_streams(prepared)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(cid, created, body.model, streams, include_usage)
        return EventSourceResponse(chunks, ping=15)
    return await handler.complete(body, prepared, cid, created, until_disconnected(request))


async def _chunks(
    cid: str,
    created: int,
    model: str,
    streams: list[tuple[StreamDelta, AsyncIterator[StreamDelta]]],
    include_usage: bool,
) -> AsyncIterator[dict[str, str]]:
    """OpenAI's chunk sequence: the role first, then content deltas, then each choice's
    finish_reason, the usage (if asked for) and ``[DONE]``."""

    def event(choices: list[ChunkChoice], usage: Usage | None = None) -> dict[str, str]:
        chunk = ChatCompletionChunk(
            id=cid, created=created, model=model, choices=choices, usage=usage
        ).model_dump()
        for choice in chunk["choices"]:  # a delta holds only what changed, as OpenAI's does
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return {"data": json.dumps(chunk)}

    for index in range(len(streams)):
        yield event([ChunkChoice(index=index, delta=ChunkDelta(role="assistant", content=""))])
    merged = merge_streams(streams)
    results: dict[int, GenerationResult] = {}
    try:
        async for index, delta in merged:
            if delta.text:
                yield event([ChunkChoice(index=index, delta=ChunkDelta(content=delta.text))])
            if delta.result is not None:
                results[index] = delta.result
                reason = finish_reason(delta.result.finish_reason)
                yield event([ChunkChoice(index=index, delta=ChunkDelta(), finish_reason=reason)])
        if include_usage:
            yield event([], usage=usage([results[i] for i in sorted(results)]))
    except Exception as exc:  # the status is already sent: report the error as a chunk
        yield {"data": bytes(to_response(exc).body).decode()}
    finally:
        await merged.aclose()
    yield {"data": "[DONE]"}
