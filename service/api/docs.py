"""``/openapi.json``, ``/docs`` and ``/redoc``: open by default; with ``RANKONE_DOCS_OPEN=false``
and keys configured, they need a client or admin key like any client route."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from service.auth import Role
from service.deps import Credentials, SettingsDep, caller_of
from service.settings import Settings

router = APIRouter(include_in_schema=False)


def _guard(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> None:
    if not settings.docs_open:
        caller_of(settings, credentials, Role.CLIENT)  # 401 without a valid key


@router.get("/openapi.json")
async def openapi(request: Request, settings: SettingsDep, credentials: Credentials) -> Any:
    _guard(settings, credentials)
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def docs(settings: SettingsDep, credentials: Credentials) -> HTMLResponse:
    _guard(settings, credentials)
    return get_swagger_ui_html(openapi_url="/openapi.json", title="rankone")


@router.get("/redoc")
async def redoc(settings: SettingsDep, credentials: Credentials) -> HTMLResponse:
    _guard(settings, credentials)
    return get_redoc_html(openapi_url="/openapi.json", title="rankone")
