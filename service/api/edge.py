"""The edge: what every route does to a request before FastAPI validates its body.

``check_client_text`` is an app-wide dependency (``create_app``), so it runs for every route
before the body is validated. It applies the client-text rule of ``service.protocol.text``:
a JSON body holding a lone UTF-16 surrogate anywhere is a 422 naming the field, so no
handler, tokenizer or store ever sees such text. The scan costs a regex over the raw bytes;
the body is decoded a second time only when that finds an escape.
"""

from __future__ import annotations

import json

from fastapi.exceptions import RequestValidationError
from starlette.requests import Request

from service.protocol.text import SURROGATE_ESCAPE, find_lone_surrogate, problem


async def check_client_text(request: Request) -> None:
    """RequestValidationError (→ 422 naming the field) for a JSON body with a lone surrogate."""
    if "json" not in request.headers.get("content-type", "").lower():
        return
    body = await request.body()  # cached on the request: FastAPI reads it from there
    if not SURROGATE_ESCAPE.search(body):
        return
    try:
        decoded = json.loads(body)
    except ValueError:
        return  # malformed JSON: FastAPI answers it (400)
    hit = find_lone_surrogate(decoded)
    if hit is not None:
        raise RequestValidationError(
            [{"type": "unicode", "loc": ("body", *hit[0]), "msg": problem(hit), "input": None}]
        )
