"""The error responses each route declares in the OpenAPI document (all ``ErrorResponse``).

``errors(...)`` builds a route's ``responses=``; every route gets 500 and 503 (the server may
be shutting down, or its store unreachable), routes with a body 400 / 413 / 422, keyed routes
401 / 403. Streaming routes add ``text/event-stream`` to their 200, with an ``itemSchema``
describing each event (its ``data`` as JSON of a named model), so that the contract test reads
the events of a stream against the document like any JSON body.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

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

DONE = "[DONE]"


def _data(model: type[BaseModel]) -> dict[str, Any]:
    """An event whose ``data`` is ``model`` as JSON (checked by contract tests that read it)."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": f"#/components/schemas/{model.__name__}"},
            }
        },
    }


def named_events(named: dict[str, type[BaseModel]]) -> dict[str, Any]:
    """One event of a stream whose event names say their data's model (if / else by name, so
    that each event's data is read against its own model only)."""
    (name, model), *rest = named.items()
    if not rest:
        return {
            "allOf": [
                {"properties": {"event": {"const": name}}, "required": ["event"]},
                _data(model),
            ]
        }
    return {
        "if": {"properties": {"event": {"const": name}}, "required": ["event"]},
        "then": _data(model),
        "else": named_events(dict(rest)),
    }


def openai_events(chunk: type[BaseModel]) -> dict[str, Any]:
    """An OpenAI stream's event: ``chunk`` (or an error) as JSON, the last one ``[DONE]``."""
    either = {
        "anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (chunk, ErrorResponse)]
    }
    item = _data(chunk)
    item["properties"]["data"]["contentSchema"] = either
    return {"if": {"properties": {"data": {"const": DONE}}}, "then": {}, "else": item}


# The models that stream events' ``$ref``s name, added to the document by add_stream_models.
STREAM_MODELS: dict[str, type[BaseModel]] = {}


def stream_content(item_schema: dict[str, Any], *models: type[BaseModel]) -> dict[str, Any]:
    """``text/event-stream`` content whose every event matches ``item_schema`` (OpenAPI 3.2's
    ``itemSchema``, which schemathesis checks event by event); ``models``: its ``$ref``s."""
    named: tuple[type[BaseModel], ...] = (*models, ErrorResponse)
    for model in named:
        STREAM_MODELS[model.__name__] = model
    return {
        "text/event-stream": {
            "itemSchema": item_schema,
            "description": 'with "stream": true, server-sent events',
        }
    }


def add_stream_models(document: dict[str, Any]) -> dict[str, Any]:
    """Put the stream events' models in ``components.schemas`` (FastAPI adds only the models
    of JSON bodies and declared responses)."""
    _, defs = models_json_schema(
        [(m, "serialization") for m in STREAM_MODELS.values()],
        ref_template="#/components/schemas/{model}",
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    return document


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


def streaming(content: dict[str, Any], *statuses: int) -> dict[int | str, dict[str, Any]]:
    """``errors`` plus ``content`` (a ``stream_content``) as a second content type of the 200."""
    return {200: {"content": content}, **errors(*statuses)}
