"""Dependencies of the routes: resources from ``app.state`` and the two auth checks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Header, Request

from service.auth import Role, authorize
from service.handlers.generation import GenerationHandler
from service.handlers.registry import RegistryHandler
from service.jobs.handler import FineTuningHandler
from service.metrics import Metrics
from service.settings import Settings


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


def get_state(request: Request) -> Any:
    return request.app.state


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[RegistryHandler, Depends(get_registry)]
GenerationDep = Annotated[GenerationHandler, Depends(get_generation)]
FineTuningDep = Annotated[FineTuningHandler, Depends(get_fine_tuning)]
StateDep = Annotated[Any, Depends(get_state)]
AuthHeader = Annotated[str | None, Header(alias="Authorization", include_in_schema=False)]


def require_client(settings: SettingsDep, authorization: AuthHeader = None) -> None:
    authorize(
        authorization, Role.CLIENT, client_keys=settings.client_keys, admin_keys=settings.admin_keys
    )


def require_admin(settings: SettingsDep, authorization: AuthHeader = None) -> None:
    authorize(
        authorization, Role.ADMIN, client_keys=settings.client_keys, admin_keys=settings.admin_keys
    )


ClientAuth = Depends(require_client)
AdminAuth = Depends(require_admin)
