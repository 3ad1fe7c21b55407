"""``Client``: the synchronous client (httpx)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from client.core import client_config, generate_path, json_of, raise_for_error
from client.errors import TransportError
from client.fine_tuning import Files, FineTuning
from client.payloads import generate_body
from client.sse import SSEDecoder
from client.tasks import SharedPrompts, Tasks
from client.types import Generation, StreamEvent

if TYPE_CHECKING:
    from client.push import PushReport


class Client:
    """A rankone server: ``Client("http://host:8000", key="...")``; use it as a context
    manager or call ``close()``.

    ``client.tasks`` / ``client.shared_prompts``: the registry (admin key);
    ``client.generate`` / ``client.stream``: generation (client key);
    ``client.push(dir)``: upload a trainer output directory;
    ``client.files`` / ``client.fine_tuning``: fine-tuning files, jobs, the worker protocol.
    """

    def __init__(
        self,
        base_url: str | None = None,
        key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(**client_config(base_url, key, timeout), transport=transport)
        self.tasks = Tasks(self)
        self.shared_prompts = SharedPrompts(self)
        self.files = Files(self)
        self.fine_tuning = FineTuning(self)

    @property
    def base_url(self) -> str:
        return str(self._http.base_url).rstrip("/")

    # --- the core every resource goes through -------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP call (httpx keyword arguments: ``json``, ``params``, ``content``,
        ``files``, ``headers``); a non-2xx answer raises its typed ``APIError``."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise TransportError(f"{method} {self.base_url}{path}: {e}") from e
        raise_for_error(response)
        return response

    def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        return json_of(self.request(method, path, **kwargs))

    # --- generation ------------------------------------------------------------------------

    def generate(self, task: str, inputs: str | list[str], **parameters: Any) -> Generation:
        """Generate for one input or a list (one output each, in order). ``parameters``:
        ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
        ``repetition_penalty``; unset ones fall back to the task's defaults."""
        body = generate_body(inputs, parameters, stream=False)
        return Generation.parse(self.request_json("POST", generate_path(task), json=body))

    def stream(self, task: str, input: str, **parameters: Any) -> Iterator[StreamEvent]:
        """Stream one input: ``token`` events as text is generated, then one ``done`` event
        whose ``output`` is the whole result. An error mid-stream raises ``APIError``."""
        body = generate_body(input, parameters, stream=True)
        try:
            with self._http.stream("POST", generate_path(task), json=body) as response:
                if not response.is_success:
                    response.read()
                    raise_for_error(response)
                decoder = SSEDecoder()
                for line in response.iter_lines():
                    event = decoder.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as e:
            raise TransportError(f"stream {task}: {e}") from e

    # --- server ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``: backbone (name, fingerprint, d), limits, store kind."""
        return dict(self.request_json("GET", "/v1/info"))

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def push(self, artifact_dir: str | Path, *, dry_run: bool = False) -> PushReport:
        """Upload a trainer output directory (shared prompts, then tasks; create or replace
        what differs); returns a ``PushReport``. See ``client.push``."""
        from client.push import push

        return push(self, artifact_dir, dry_run=dry_run)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
