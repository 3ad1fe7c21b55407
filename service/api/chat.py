"""``POST /v1/chat/completions`` (client key), OpenAI-compatible: ``model`` is the task name.

The conversation is rendered by the backbone's chat template and the task's soft prompt goes in
front of it (prompts/chat.py); the official ``openai`` client works unchanged, streaming too.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from service.api.responses import GENERATION, openai_events, stream_content, streaming
from service.api.streams import event_stream
from service.deps import ClientCaller, GenerationDep, until_disconnected
from service.handlers.chat import ChatHandler
from service.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
)

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
    if body.stream:
        return event_stream(await handler.open_stream(body, prepared), done=True)
    return await handler.complete(body, prepared, until_disconnected(request))
