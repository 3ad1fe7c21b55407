"""The error responses each route declares in the OpenAPI document (all ``ErrorResponse``).

``errors(...)`` builds a route's ``responses=``; every route gets 500 and 503 (the server may
be shutting down, or its store unreachable), routes with a body 400 / 413 / 422, keyed routes
401 / 403. Streaming routes add ``text/event-stream`` to their 200.
"""

from __future__ import annotations

from typing import Any

from service.protocol.errors import ErrorResponse

_DESCRIPTIONS = {
    400: "malformed JSON body",
    401: "missing or unknown API key",
    403: "admin key needed, or the key's scope excludes this task",
    404: "no such task, shared prompt or route",
    409: "already exists, or made for another backbone",
    413: "request body over the server's limit",
    422: "invalid request: the message names the field and the problem",
    429: "the queue is full: retry after the Retry-After header's seconds",
    500: "internal error (logged with the request id)",
    503: "shutting down, or the factor store is unreachable",
    504: "the request took longer than the server's deadline",
}

KEYED = (401, 403)
BODY = (400, 413, 422)
GENERATION = (*KEYED, *BODY, 404, 429, 504)

SSE: dict[str, Any] = {
    "text/event-stream": {
        "schema": {"type": "string"},
        "description": 'with "stream": true, server-sent events',
    }
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route answering ``statuses`` (plus 500 and 503) as ErrorResponse."""
    codes = sorted({*statuses, 500, 503})
    return {
        code: {
            "model": ErrorResponse,
            "description": _DESCRIPTIONS.get(code, "error"),
            **(
                {"headers": {"Retry-After": {"schema": {"type": "integer"}}}} if code == 429 else {}
            ),
        }
        for code in codes
    }


def streaming(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``errors`` plus ``text/event-stream`` as a second content type of the 200."""
    return {200: {"content": SSE}, **errors(*statuses)}
