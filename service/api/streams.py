"""SSE framing, written once: a handler's ``ServerEvent``s as an ``EventSourceResponse``.

The handler opened its stream before the route answers (so queue-full and timeout errors are
still HTTP errors); past the first byte the status is sent, so an error is reported in the
stream itself: as an ``error_event`` named event (native generate), or as a plain ``data:``
event with the error body (OpenAI), followed by ``data: [DONE]`` when ``done`` is set.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse

from service.api.errors import to_response
from service.handlers.events import ServerEvent

PING_S = 15


def event_stream(
    events: AsyncIterator[ServerEvent], *, error_event: str | None = None, done: bool = False
) -> EventSourceResponse:
    async def frames() -> AsyncIterator[dict[str, str]]:
        try:
            async for item in events:
                frame = {"data": item.data.model_dump_json()}
                yield frame if item.event is None else {"event": item.event, **frame}
        except Exception as exc:  # the status is already sent: report the error as an event
            error = {"data": bytes(to_response(exc).body).decode()}
            yield error if error_event is None else {"event": error_event, **error}
            if error_event is not None:
                return
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        if done:
            yield {"data": "[DONE]"}

    return EventSourceResponse(frames(), ping=PING_S)
