"""Every error as ``{"error": {"code", "message"}}`` with the right status.

Mapping: ApiError → its status; RequestValidationError → 422 (field: problem; ...);
malformed JSON → 400; a body not sent as JSON → 422 saying so; InvalidNameError → 422
invalid_name; BackboneMismatchError → 409 (the artifact is valid, it conflicts with
the served backbone); other ArtifactError → 422; NotFoundError → 404; ConflictError → 409;
UnknownSharedError → 422; StoreError → 503; QueueFullError → 429 + Retry-After (from the
engine's measured drain rate); NonFiniteLogitsError → 422 (that request alone failed);
EngineClosedError → 503; anything else → 500, logged with the request id.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from prompts.errors import ArtifactError, BackboneMismatchError, InvalidNameError
from service.engine.base import EngineClosedError, QueueFullError
from service.engine.sampling import NonFiniteLogitsError
from service.errors import ApiError
from service.logging import request_id_var
from service.store.base import ConflictError, NotFoundError, StoreError, UnknownSharedError

log = logging.getLogger("rankone.errors")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


_NOT_AN_OBJECT = ("model_attributes_type", "dict_type", "model_type")


def describe_validation(
    exc: RequestValidationError, content_type: str = "application/json"
) -> tuple[int, str, str]:
    problems = []
    if "json" not in content_type.lower() and any(
        tuple(err.get("loc", ())) == ("body",) and err.get("type") in _NOT_AN_OBJECT
        for err in exc.errors()
    ):
        got = content_type or "no Content-Type"
        return (
            422,
            "invalid_request",
            f"the body must be a JSON object sent with 'Content-Type: application/json' "
            f"(got {got})",
        )
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return 400, "invalid_json", f"malformed JSON body: {ctx.get('error', err['msg'])}"
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc) or "body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"{where}: {msg}")
    return 422, "invalid_request", "; ".join(problems) or "invalid request"


def status_for(exc: Exception) -> tuple[int, str, str, dict[str, str] | None]:
    """(status, code, message, headers) of the error response ``exc`` maps to."""
    return _status_for(exc)


def _status_for(exc: Exception) -> tuple[int, str, str, dict[str, str] | None]:
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.message, exc.headers
    if isinstance(exc, ValidationError):  # parameters merged with stored task defaults
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return 422, "invalid_request", problems, None
    if isinstance(exc, InvalidNameError):
        return 422, "invalid_name", str(exc), None
    if isinstance(exc, BackboneMismatchError):
        return 409, "backbone_mismatch", str(exc), None
    if isinstance(exc, ArtifactError):
        return 422, "invalid_artifact", str(exc), None
    if isinstance(exc, UnknownSharedError):
        return 422, "unknown_shared_prompt", str(exc), None
    if isinstance(exc, NotFoundError):
        return 404, "not_found", str(exc), None
    if isinstance(exc, ConflictError):
        return 409, "conflict", str(exc), None
    if isinstance(exc, StoreError):
        return 503, "store_unavailable", f"factor store unavailable: {exc}", None
    if isinstance(exc, QueueFullError):
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        return 429, "queue_full", str(exc), {"Retry-After": retry}
    if isinstance(exc, NonFiniteLogitsError):
        return 422, "generation_failed", str(exc), None
    if isinstance(exc, EngineClosedError):
        return 503, "shutting_down", str(exc) or "the server is shutting down", None
    return 500, "internal_error", "internal server error", None


def to_response(exc: Exception) -> JSONResponse:
    status, code, message, headers = _status_for(exc)
    if status == 500:
        log.exception("unhandled error (request id %s)", request_id_var.get(), exc_info=exc)
        message = f"internal server error (request id {request_id_var.get()})"
    elif isinstance(exc, StoreError):
        log.warning("store error: %s", exc)
    return error_response(status, code, message, headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (its ``Allow`` header)."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    ]


def install(app: FastAPI) -> None:
    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        content_type = request.headers.get("content-type", "")
        return error_response(*describe_validation(exc, content_type))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names the first matching route's methods only
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(
            exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail), headers
        )

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return to_response(exc)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for exc_type in (
        ApiError,
        ArtifactError,
        NotFoundError,
        ConflictError,
        StoreError,
        QueueFullError,
        EngineClosedError,
        Exception,
    ):
        app.add_exception_handler(exc_type, on_error)
