"""One pure-ASGI middleware: request id, body-size limit, access log, metrics, last-resort 500.

The body limit is enforced twice: a ``Content-Length`` over the limit is refused before the
body is read, and a byte counter on ``receive`` stops chunked bodies that grow past it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response, to_response
from service.logging import request_id_var

log = logging.getLogger("rankone.http")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
OPEN_PATHS = ("/healthz", "/readyz", "/metrics")


class BodyTooLarge(Exception):
    pass


class ServiceMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = {"code": 500, "sent": False, "overflow": False, "replaced": False}
        limit: int = state.settings.max_body_bytes

        async def send_wrapper(message: Message) -> None:
            if status["replaced"]:
                return
            if status["overflow"] and message["type"] == "http.response.start":
                # The framework turned the aborted body read into its own error: answer 413.
                status["replaced"] = True
                await too_large()(scope, receive, send_wrapper_raw)
                return
            await send_wrapper_raw(message)

        async def send_wrapper_raw(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        received = 0

        def too_large() -> Any:
            return error_response(
                413, "body_too_large", f"request body exceeds the limit of {limit} bytes"
            )

        async def receive_wrapper() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    status["overflow"] = True
                    raise BodyTooLarge
            return message

        try:
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > limit:
                raise BodyTooLarge
            if getattr(state, "draining", False) and scope["path"] not in OPEN_PATHS:
                response = error_response(503, "shutting_down", "the server is shutting down")
                await response(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except Exception as exc:
            if status["sent"]:
                log.exception("error after the response started")
            else:
                response = too_large() if isinstance(exc, BodyTooLarge) else to_response(exc)
                await response(scope, receive, send_wrapper_raw)
        finally:
            self._observe(scope, state, status["code"], time.perf_counter() - started)
            request_id_var.reset(token)

    @staticmethod
    def _observe(scope: Scope, state: Any, code: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        metrics = getattr(state, "metrics", None)
        if metrics is not None:
            metrics.observe_request(scope["method"], template, code, seconds)
        log.info(
            "%s %s %d",
            scope["method"],
            scope["path"],
            code,
            extra={"route": template, "status": code, "ms": round(seconds * 1000, 1)},
        )
