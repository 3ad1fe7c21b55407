"""What the sync and the async client share: configuration, headers and error mapping.

Extending the client with a new resource group (files, fine-tuning jobs, ...) is one small
class per flavour whose methods call ``client.request(...)`` / ``client.request_json(...)``
and parse the answer; see ``client/tasks.py`` for the pattern.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import httpx

from client.errors import error_from

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0


def client_config(
    base_url: str | None, key: str | None, timeout: float | httpx.Timeout | None
) -> dict[str, Any]:
    """httpx keyword arguments; ``base_url`` / ``key`` default to ``$RANKONE_URL`` /
    ``$RANKONE_KEY``, then to a local server without a key."""
    url = (base_url or os.environ.get("RANKONE_URL") or DEFAULT_URL).rstrip("/")
    key = key if key is not None else os.environ.get("RANKONE_KEY") or None
    headers = {"Accept": "application/json", "User-Agent": "rankone-client/0.1"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return {
        "base_url": url,
        "headers": headers,
        "timeout": DEFAULT_TIMEOUT if timeout is None else timeout,
    }


def raise_for_error(response: httpx.Response) -> None:
    """Raise the typed ``APIError`` of a non-2xx answer (the body must have been read)."""
    if response.is_success:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    raise error_from(response.status_code, body, dict(response.headers), response.text)


def json_of(response: httpx.Response) -> Any:
    return response.json() if response.content else None


def generate_path(task: str) -> str:
    return f"/v1/tasks/{quote(task, safe='')}/generate"
