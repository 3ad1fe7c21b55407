"""Native generation route (client key): ``POST /v1/tasks/{task}/generate``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from sse_starlette import EventSourceResponse

from prompts.artifacts import NAME_PATTERN
from service.api.responses import GENERATION, named_events, stream_content, streaming
from service.api.streams import event_stream
from service.deps import ClientCaller, GenerationDep, until_disconnected
from service.handlers.generation import generate_response, token_events
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
        return event_stream(token_events(first, stream), error_event="error")
    results = await handler.run(prepared, until_disconnected(request))
    return generate_response(prepared, results)
