"""The Python client of the rankone HTTP API (httpx; no torch needed).

    from client import Client
    with Client("http://127.0.0.1:8000", key="...") as c:
        c.push("runs/new")                      # a trainer output: shared prompts, then tasks
        print(c.generate("my-task", "some input").texts[0])
        for event in c.stream("my-task", "some input"):
            print(event.text, end="")

``AsyncClient`` has the same calls with ``await`` (``async for`` for ``stream`` and
``tasks.list``). Errors are ``client.errors.APIError`` subclasses with ``status``, ``code``
and ``message`` from the server's ``{"error": {...}}``.
"""

from client.aio import AsyncClient
from client.errors import (
    APIError,
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RankoneError,
    RateLimitError,
    ServerError,
    TransportError,
)
from client.push import PushReport
from client.sync import Client
from client.types import (
    BatchItem,
    Generation,
    Output,
    SharedPromptInfo,
    StreamEvent,
    TaskInfo,
    Usage,
)

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "BatchItem",
    "Client",
    "ConflictError",
    "Generation",
    "InvalidRequestError",
    "NotFoundError",
    "Output",
    "PermissionDeniedError",
    "PushReport",
    "RankoneError",
    "RateLimitError",
    "ServerError",
    "SharedPromptInfo",
    "StreamEvent",
    "TaskInfo",
    "TransportError",
    "Usage",
]
