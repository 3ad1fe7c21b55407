"""Dependencies of the routes: resources from ``app.state`` and the auth checks.

``ClientCaller`` / ``AdminCaller`` authenticate the request (401 / 403) and hand the route a
``service.auth.Caller``; a route then calls ``caller.check(task_name)`` for each task name it
touches (403 outside a scoped key's patterns) and ``caller.allows`` to filter listings.
``ClientAuth`` / ``AdminAuth`` are the same checks for a router's ``dependencies=[...]``
(FastAPI runs a dependency once per request, so a route may use both).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import Caller, Role, authenticate, parse_entries
from service.handlers.files import FilesHandler
from service.handlers.fine_tuning import FineTuningHandler
from service.handlers.generation import GenerationHandler
from service.handlers.registry import RegistryHandler
from service.handlers.workers import WorkersHandler
from service.metrics import Metrics
from service.settings import Settings


def until_disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """A waiter that returns once the client has gone. After the body is read, the ASGI
    server answers ``receive()`` with ``http.disconnect`` when the connection closes (or the
    response is complete), so waiting on it costs nothing per request, where polling
    ``is_disconnected`` woke the event loop for every request five times a second."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass  # a body chunk the route did not read: keep waiting

    return wait


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


def get_registry(request: Request) -> RegistryHandler:
    return request.app.state.registry  # type: ignore[no-any-return]


def get_generation(request: Request) -> GenerationHandler:
    return request.app.state.generation  # type: ignore[no-any-return]


def get_fine_tuning(request: Request) -> FineTuningHandler:
    return request.app.state.fine_tuning  # type: ignore[no-any-return]


def get_files(request: Request) -> FilesHandler:
    return request.app.state.files  # type: ignore[no-any-return]


def get_workers(request: Request) -> WorkersHandler:
    return request.app.state.workers  # type: ignore[no-any-return]


def get_state(request: Request) -> Any:
    return request.app.state


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[RegistryHandler, Depends(get_registry)]
GenerationDep = Annotated[GenerationHandler, Depends(get_generation)]
FineTuningDep = Annotated[FineTuningHandler, Depends(get_fine_tuning)]
FilesDep = Annotated[FilesHandler, Depends(get_files)]
WorkersDep = Annotated[WorkersHandler, Depends(get_workers)]
StateDep = Annotated[Any, Depends(get_state)]

# Declares the bearer scheme in the OpenAPI document; missing / wrong keys are ours to answer.
_bearer = HTTPBearer(auto_error=False, description="a client or admin API key")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def caller_of(
    settings: Settings, credentials: HTTPAuthorizationCredentials | None, role: Role
) -> Caller:
    return authenticate(
        credentials.credentials if credentials is not None else None,
        role,
        client_keys=parse_entries(tuple(settings.client_keys)),
        admin_keys=parse_entries(tuple(settings.admin_keys)),
    )


def client_caller(settings: SettingsDep, credentials: Credentials) -> Caller:
    return caller_of(settings, credentials, Role.CLIENT)


def admin_caller(settings: SettingsDep, credentials: Credentials) -> Caller:
    return caller_of(settings, credentials, Role.ADMIN)


ClientCaller = Annotated[Caller, Depends(client_caller)]
AdminCaller = Annotated[Caller, Depends(admin_caller)]
ClientAuth = Depends(client_caller)
AdminAuth = Depends(admin_caller)
