"""The chat handler: render the conversation with the backbone's chat template (prompts/chat.py,
the trainer's rule), then generate through the same GenerationHandler as every other route, so
chat requests join the same mixed-task batches under the same limits and deadlines."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from prompts.chat import chat_input_ids
from prompts.errors import RankoneError
from service.engine.base import GenerationResult, StreamDelta
from service.errors import ApiError
from service.handlers.generation import Disconnected, GenerationHandler, Prepared, close_stream
from service.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    FinishReason,
)
from service.protocol.generate import Usage


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def finish_reason(engine_reason: str | None) -> FinishReason | None:
    if engine_reason is None:
        return None
    return "length" if engine_reason == "length" else "stop"


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
        cid: str,
        created: int,
        disconnected: Disconnected | None = None,
    ) -> ChatCompletionResponse:
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
