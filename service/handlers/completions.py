"""The completions handler (``POST /v1/completions``, OpenAI-compatible; ``model`` is the task):
prepare through the GenerationHandler like every route, then build the reply, or the stream's
``text_completion`` chunks (framed by ``service.api.streams``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from service.auth import Caller
from service.engine.base import StreamDelta
from service.handlers.events import ServerEvent
from service.handlers.generation import (
    Disconnected,
    GenerationHandler,
    Prepared,
    close_stream,
    completion_id,
    outputs,
)
from service.protocol.openai import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    finish_reason,
)


class CompletionsHandler:
    def __init__(self, generation: GenerationHandler) -> None:
        self.generation = generation

    async def prepare(self, body: CompletionRequest, caller: Caller) -> Prepared:
        return await self.generation.prepare(
            caller.check(body.model), body.prompts, body.parameters()
        )

    async def complete(
        self, body: CompletionRequest, prepared: Prepared, disconnected: Disconnected | None
    ) -> CompletionResponse:
        results = await self.generation.run(prepared, disconnected)
        outs, usage = outputs(results)
        choices = [
            CompletionChoice(text=o.text, index=i, finish_reason=finish_reason(o.finish_reason))
            for i, o in enumerate(outs)
        ]
        return CompletionResponse(
            id=completion_id(),
            created=int(time.time()),
            model=body.model,
            choices=choices,
            usage=usage,
        )

    async def open_stream(
        self, body: CompletionRequest, prepared: Prepared
    ) -> AsyncIterator[ServerEvent]:
        """The stream, past its first delta (errors until then are HTTP errors): one chunk per
        piece of text, the last with its finish_reason."""
        first, stream = await self.generation.open_stream(prepared.requests[0])
        return self._chunks(completion_id(), int(time.time()), body.model, first, stream)

    async def _chunks(
        self,
        cid: str,
        created: int,
        model: str,
        first: StreamDelta,
        stream: AsyncIterator[StreamDelta],
    ) -> AsyncIterator[ServerEvent]:
        def chunk(text: str, reason: str | None) -> ServerEvent:
            choice = CompletionChoice(text=text, index=0, finish_reason=finish_reason(reason))
            return ServerEvent(
                CompletionChunk(id=cid, created=created, model=model, choices=[choice])
            )

        delta: StreamDelta | None = first
        try:
            while delta is not None:
                if delta.result is not None:
                    yield chunk(delta.text, delta.result.finish_reason)
                    return
                if delta.text:
                    yield chunk(delta.text, None)
                delta = await anext(stream, None)
        finally:
            await close_stream(stream)
