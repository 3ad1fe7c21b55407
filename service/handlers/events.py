"""A server-sent event as a handler produces it: the reply model it carries, and its event
name (None: a plain ``data:`` event, as OpenAI streams send). Handlers build the events of
every stream; ``service.api.streams`` frames them, once for all routes."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


@dataclass(frozen=True)
class ServerEvent:
    data: BaseModel
    event: str | None = None
