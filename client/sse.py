"""Server-sent events, decoded line by line (the same decoder for sync and async streams)."""

from __future__ import annotations

import json

from client.errors import error_from
from client.types import Output, StreamEvent, from_json


class SSEDecoder:
    """Feed lines; a blank line completes an event, returned as a ``StreamEvent``."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> StreamEvent | None:
        line = line.rstrip("\r")
        if line.startswith(":"):  # a comment: the server's keep-alive ping
            return None
        if line:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                self._event = value
            elif key == "data":
                self._data.append(value)
            return None
        if not self._data:
            self._event = "message"
            return None
        event, data = self._event, "\n".join(self._data)
        self._event, self._data = "message", []
        return _to_event(event, data)


def _to_event(event: str, data: str) -> StreamEvent:
    payload = json.loads(data)
    if event == "error":
        raise error_from(None, payload)
    if event == "done":
        return StreamEvent("done", text="", output=from_json(Output, payload))
    return StreamEvent(event, text=payload.get("text", ""), token_ids=payload.get("token_ids", []))
