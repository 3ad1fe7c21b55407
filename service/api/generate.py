"""Native generation route (client key): ``POST /v1/tasks/{task}/generate``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Path, Request
from sse_starlette import EventSourceResponse

from prompts.artifacts import NAME_PATTERN
from service.api.errors import to_response
from service.api.responses import GENERATION, named_events, stream_content, streaming
from service.deps import ClientCaller, GenerationDep, until_disconnected
from service.engine.base import StreamDelta
from service.handlers.generation import GenerationHandler, close_stream, outputs
from service.protocol.errors import ErrorResponse
from service.protocol.generate import GenerateRequest, GenerateResponse, Output, TokenEvent

router = APIRouter(prefix="/v1", tags=["generation"])


EVENTS = stream_content(
    named_events({"token": TokenEvent, "done": Output, "error": ErrorResponse}), TokenEvent, Output
)


@router.post(
    "/tasks/{task}/generate",
    response_model=GenerateResponse,
    responses=streaming(EVENTS, *GENERATION),
)
async def generate(
    task: Annotated[str, Path(description=f"task name: {NAME_PATTERN.pattern}")],
    body: GenerateRequest,
    handler: GenerationDep,
    caller: ClientCaller,
    request: Request,
) -> GenerateResponse | EventSourceResponse:
    """Generate for one input or a list; ``"stream": true`` answers server-sent events
    (``token`` events, then ``done`` with the whole output, or ``error``)."""
    prepared = await handler.prepare(caller.check(task), body.input_list, body.parameters)
    if body.stream:
        first, stream = await handler.open_stream(prepared.requests[0])
        return EventSourceResponse(_events(handler, first, stream), ping=15)
    results = await handler.run(prepared, until_disconnected(request))
    outs, usage = outputs(results)
    return GenerateResponse(
        task=prepared.task.name,
        version=prepared.task.version,
        texts=[o.text for o in outs],
        outputs=outs,
        usage=usage,
    )


async def _events(
    handler: GenerationHandler, first: StreamDelta, stream: AsyncIterator[StreamDelta]
) -> AsyncIterator[dict[str, str]]:
    """``token`` events carry new text; the final ``done`` event carries the whole output."""
    delta: StreamDelta | None = first
    try:
        while delta is not None:
            if delta.text or delta.token_ids:
                token = TokenEvent(text=delta.text, token_ids=delta.token_ids)
                yield {"event": "token", "data": token.model_dump_json()}
            if delta.result is not None:
                r = delta.result
                out = Output(
                    text=r.text,
                    finish_reason=r.finish_reason,
                    prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens,
                )
                yield {"event": "done", "data": out.model_dump_json()}
                return
            delta = await anext(stream, None)
    except Exception as exc:  # the status is already sent: report the error as an event
        yield {"event": "error", "data": bytes(to_response(exc).body).decode()}
    finally:
        await close_stream(stream)
