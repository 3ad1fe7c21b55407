"""``AsyncClient``: the asyncio client (httpx.AsyncClient), the same calls as ``Client``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from client.core import client_config, generate_path, json_of, raise_for_error
from client.errors import TransportError
from client.fine_tuning import AsyncFiles, AsyncFineTuning
from client.payloads import generate_body
from client.sse import SSEDecoder
from client.tasks import AsyncSharedPrompts, AsyncTasks
from client.types import Generation, StreamEvent


class AsyncClient:
    """``async with AsyncClient(url, key=...) as c: await c.generate(...)``."""

    def __init__(
        self,
        base_url: str | None = None,
        key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(**client_config(base_url, key, timeout), transport=transport)
        self.tasks = AsyncTasks(self)
        self.shared_prompts = AsyncSharedPrompts(self)
        self.files = AsyncFiles(self)
        self.fine_tuning = AsyncFineTuning(self)

    @property
    def base_url(self) -> str:
        return str(self._http.base_url).rstrip("/")

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise TransportError(f"{method} {self.base_url}{path}: {e}") from e
        raise_for_error(response)
        return response

    async def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        return json_of(await self.request(method, path, **kwargs))

    async def generate(self, task: str, inputs: str | list[str], **parameters: Any) -> Generation:
        body = generate_body(inputs, parameters, stream=False)
        return Generation.parse(await self.request_json("POST", generate_path(task), json=body))

    async def stream(self, task: str, input: str, **parameters: Any) -> AsyncIterator[StreamEvent]:
        body = generate_body(input, parameters, stream=True)
        try:
            async with self._http.stream("POST", generate_path(task), json=body) as response:
                if not response.is_success:
                    await response.aread()
                    raise_for_error(response)
                decoder = SSEDecoder()
                async for line in response.aiter_lines():
                    event = decoder.feed(line)
                    if event is not None:
                        yield event
        except httpx.TransportError as e:
            raise TransportError(f"stream {task}: {e}") from e

    async def info(self) -> dict[str, Any]:
        return dict(await self.request_json("GET", "/v1/info"))

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
