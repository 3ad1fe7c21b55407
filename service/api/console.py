"""The web console: static files under ``/console`` (service/console/), and ``/`` pointing to it.

The console is plain HTML, CSS and JavaScript modules (no build step). It holds no secret
and uses no private route: every action is a call of the public API with the key the user
types, kept in the page's ``sessionStorage``. The pages are open (they carry no data); the
API calls they make need keys like any client's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"

# Scripts, styles and requests from this origin only: a task name or a model's answer shown by
# the console can never run as code, and no other site may frame the page.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


class ConsoleFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response: Any = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response  # type: ignore[no-any-return]


def mount(app: FastAPI) -> None:
    """``/`` → ``/console/``, and the console's files at ``/console``."""
    app.include_router(router)
    app.mount("/console", ConsoleFiles(directory=CONSOLE_DIR, html=True), name="console")
