"""Typed errors: every non-2xx answer becomes an ``APIError`` subclass carrying the server's
``{"error": {"code", "message"}}`` and the HTTP status."""

from __future__ import annotations

from typing import Any


class RankoneError(Exception):
    """Base of every error the client raises."""


class TransportError(RankoneError):
    """The server could not be reached, or the connection broke (no HTTP answer)."""


class APIError(RankoneError):
    """The server answered with an error: ``status`` (None inside a stream), ``code``, ``message``."""

    def __init__(
        self,
        status: int | None,
        code: str,
        message: str,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        where = f"HTTP {status}" if status is not None else "stream error"
        super().__init__(f"{where} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body
        self.headers = headers or {}


class InvalidRequestError(APIError):
    """400 / 422: the request (or an uploaded artifact) is malformed or does not fit."""


class AuthenticationError(APIError):
    """401: missing or unknown key."""


class PermissionDeniedError(APIError):
    """403: the key is valid but not allowed here (e.g. a client key on an admin route)."""


class NotFoundError(APIError):
    """404: no such task, shared prompt or route."""


class ConflictError(APIError):
    """409: it exists already (use replace), or it was made for another backbone."""


class RateLimitError(APIError):
    """429: the server's queue is full; ``retry_after`` seconds is its hint."""

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None


class ServerError(APIError):
    """5xx: the server failed or is unavailable (store down, shutting down, timeout)."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: InvalidRequestError,
    415: InvalidRequestError,
    422: InvalidRequestError,
    429: RateLimitError,
}

_BY_CODE: dict[str, type[APIError]] = {
    "invalid_request": InvalidRequestError,
    "invalid_artifact": InvalidRequestError,
    "invalid_name": InvalidRequestError,
    "unauthorized": AuthenticationError,
    "forbidden": PermissionDeniedError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "backbone_mismatch": ConflictError,
    "queue_full": RateLimitError,
}


def error_from(
    status: int | None, body: Any, headers: dict[str, str] | None = None, text: str = ""
) -> APIError:
    """The typed error for an error answer (``status`` None: an ``error`` event of a stream)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code, message = str(err.get("code", "error")), str(err.get("message", ""))
    else:
        code, message = "http_error", (text or "no error body")[:500]
    if status is not None:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    else:
        cls = _BY_CODE.get(code, APIError)
    return cls(status, code, message, body=body, headers=headers)
