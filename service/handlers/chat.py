"""The chat handler: render the conversation with the backbone's chat template (prompts/chat.py,
the trainer's rule), then generate through the same GenerationHandler as every other route, so
chat requests join the same mixed-task batches under the same limits and deadlines."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from prompts.chat import chat_input_ids
from prompts.errors import RankoneError
from service.engine.base import GenerationResult, StreamDelta
from service.errors import ApiError
from service.handlers.events import ServerEvent
from service.handlers.generation import Disconnected, GenerationHandler, Prepared, close_stream
from service.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    ChunkDelta,
)
from service.protocol.generate import Usage
from service.protocol.openai import finish_reason


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(results: list[GenerationResult]) -> Usage:
    """OpenAI counts the conversation once, however many choices were generated from it."""
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(r.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


class ChatHandler:
    def __init__(self, generation: GenerationHandler) -> None:
        self.generation = generation

    def _encode(self, body: ChatCompletionRequest) -> list[list[int]]:
        try:
            ids = chat_input_ids(self.generation.backbone.tokenizer, body.conversation)
        except RankoneError as e:
            raise ApiError(422, "invalid_conversation", str(e)) from None
        return [self.generation.check_length(ids)] * body.n

    async def prepare(self, body: ChatCompletionRequest) -> Prepared:
        """One engine request per choice; with a seed, choice ``i`` samples with ``seed + i``."""
        if self.generation.backbone.chat_template is None:
            raise ApiError(
                400,
                "no_chat_template",
                f"the served backbone ({self.generation.backbone.name}) has no chat template, "
                "so it cannot render chat messages; use /v1/completions with plain text",
            )
        prepared = await self.generation.prepare_encoded(
            body.model, lambda: self._encode(body), body.parameters()
        )
        for i, request in enumerate(prepared.requests):
            if request.params.seed is not None and i:
                request.params = dataclasses.replace(request.params, seed=request.params.seed + i)
        return prepared

    async def complete(
        self,
        body: ChatCompletionRequest,
        prepared: Prepared,
        disconnected: Disconnected | None = None,
    ) -> ChatCompletionResponse:
        cid, created = chat_completion_id(), int(time.time())
        results = await self.generation.run(prepared, disconnected)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=r.text),
                finish_reason=finish_reason(r.finish_reason),
            )
            for i, r in enumerate(results)
        ]
        return ChatCompletionResponse(
            id=cid, created=created, model=body.model, choices=choices, usage=usage(results)
        )

    async def open_stream(
        self, body: ChatCompletionRequest, prepared: Prepared
    ) -> AsyncIterator[ServerEvent]:
        """Every choice's stream, opened (errors until then are HTTP errors), as OpenAI's chunk
        sequence: the role first, then content deltas, then each choice's finish_reason, the
        usage (if asked for); ``service.api.streams`` adds ``[DONE]``."""
        streams = await self.open_streams(prepared)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return self._chunks(
            chat_completion_id(), int(time.time()), body.model, streams, include_usage
        )

    async def _chunks(
        self,
        cid: str,
        created: int,
        model: str,
        streams: list[tuple[StreamDelta, AsyncIterator[StreamDelta]]],
        include_usage: bool,
    ) -> AsyncIterator[ServerEvent]:
        def event(choices: list[ChunkChoice], usage: Usage | None = None) -> ServerEvent:
            return ServerEvent(
                ChatCompletionChunk(
                    id=cid, created=created, model=model, choices=choices, usage=usage
                )
            )

        for index in range(len(streams)):
            yield event([ChunkChoice(index=index, delta=ChunkDelta(role="assistant", content=""))])
        merged = merge_streams(streams)
        results: dict[int, GenerationResult] = {}
        try:
            async for index, delta in merged:
                if delta.text:
                    yield event([ChunkChoice(index=index, delta=ChunkDelta(content=delta.text))])
                if delta.result is not None:
                    results[index] = delta.result
                    reason = finish_reason(delta.result.finish_reason)
                    yield event(
                        [ChunkChoice(index=index, delta=ChunkDelta(), finish_reason=reason)]
                    )
            if include_usage:
                yield event([], usage=usage([results[i] for i in sorted(results)]))
        finally:
            await merged.aclose()

    async def open_streams(
        self, prepared: Prepared
    ) -> list[tuple[StreamDelta, AsyncIterator[StreamDelta]]]:
        """Every choice's stream, started together (so they share batches) and each past its
        first delta, so queue-full and timeout errors are still answered as HTTP errors."""
        opened = await asyncio.gather(
            *(self.generation.open_stream(r) for r in prepared.requests), return_exceptions=True
        )
        failed = [o for o in opened if isinstance(o, BaseException)]
        if failed:
            for o in opened:
                if not isinstance(o, BaseException):
                    await close_stream(o[1])
            raise failed[0]
        return [o for o in opened if not isinstance(o, BaseException)]


async def merge_streams(
    streams: list[tuple[StreamDelta, AsyncIterator[StreamDelta]]],
) -> AsyncGenerator[tuple[int, StreamDelta]]:
    """``(choice index, delta)`` from all streams as they come; each ends with its result.

    An error in any stream is raised here (the others are cancelled); closing this iterator
    closes every stream, which frees their batch rows.
    """
    queue: asyncio.Queue[tuple[int, StreamDelta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, first: StreamDelta, stream: AsyncIterator[StreamDelta]) -> None:
        try:
            delta: StreamDelta | None = first
            while delta is not None:
                queue.put_nowait((index, delta))
                if delta.result is not None:
                    break
                delta = await anext(stream, None)
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            await close_stream(stream)
            queue.put_nowait((index, None))

    pumps = [asyncio.ensure_future(pump(i, *pair)) for i, pair in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
