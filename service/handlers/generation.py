"""The generation handler: resolve the task, merge its defaults, check limits, tokenize, and
submit one engine request per input (concurrently), under the request deadline."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prompts.artifacts import check_name
from prompts.backbone import Backbone
from service.engine.base import (
    Engine,
    GenerationRequest,
    GenerationResult,
    ResolvedTask,
    SamplingParams,
    StreamDelta,
)
from service.errors import ApiError
from service.logging import request_id_var
from service.protocol.generate import GenerationParameters, Output, Usage
from service.settings import Settings


@dataclass
class Prepared:
    task: ResolvedTask
    requests: list[GenerationRequest]


def outputs(results: list[GenerationResult]) -> tuple[list[Output], Usage]:
    outs = [
        Output(
            text=r.text,
            finish_reason=r.finish_reason,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
        )
        for r in results
    ]
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return outs, Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


class GenerationHandler:
    def __init__(self, store: Any, engine: Engine, backbone: Backbone, settings: Settings) -> None:
        self.store = store
        self.engine = engine
        self.backbone = backbone
        self.settings = settings
        # Long inputs tokenize off the event loop, one at a time (fast tokenizers are not
        # safe to call concurrently).
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="rankone-tokenize")

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    def _sampling(self, params: GenerationParameters) -> SamplingParams:
        sampling = params.to_sampling_params(
            min(self.settings.default_max_new_tokens, self.settings.max_new_tokens_limit)
        )
        limit = self.settings.max_new_tokens_limit
        if sampling.max_new_tokens > limit:
            raise ApiError(
                422,
                "max_new_tokens_too_large",
                f"max_new_tokens={sampling.max_new_tokens} exceeds this server's limit of {limit}",
            )
        return sampling

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = self.backbone.tokenizer(text)["input_ids"]
        return self.check_length(ids)

    def check_length(self, ids: list[int]) -> list[int]:
        limit = self.settings.max_input_tokens
        if len(ids) > limit:
            raise ApiError(
                422, "input_too_long", f"input has {len(ids)} tokens; the limit is {limit} tokens"
            )
        return ids

    async def prepare(
        self, task_name: str, inputs: list[str], params: GenerationParameters
    ) -> Prepared:
        return await self.prepare_encoded(
            task_name, lambda: [self.tokenize(text) for text in inputs], params
        )

    async def prepare_encoded(
        self,
        task_name: str,
        encode: Callable[[], list[list[int]]],
        params: GenerationParameters,
    ) -> Prepared:
        """One request per token-id list that ``encode`` returns (run on the tokenizer thread;
        it checks the input limit itself, see ``check_length``)."""
        check_name(task_name, "task name")
        # the task's default parameters come with its factors, from the store's device cache
        task, defaults = await self.store.resolve_with_defaults(task_name)
        merged = params.merged_over(defaults)
        sampling = self._sampling(merged)
        base = request_id_var.get()
        loop = asyncio.get_running_loop()
        token_ids = await loop.run_in_executor(self._tokenizer_thread, encode)
        requests = [
            GenerationRequest(
                request_id=f"{base}-{i}" if len(token_ids) > 1 else base,
                task=task,
                input_ids=ids,
                params=sampling,
            )
            for i, ids in enumerate(token_ids)
        ]
        return Prepared(task, requests)

    async def run(self, prepared: Prepared) -> list[GenerationResult]:
        """All inputs concurrently; if one fails (queue full, timeout) the rest are cancelled."""
        jobs = [asyncio.ensure_future(self.engine.generate(r)) for r in prepared.requests]
        try:
            return list(
                await asyncio.wait_for(asyncio.gather(*jobs), self.settings.request_timeout_s)
            )
        except TimeoutError:
            raise self._timeout() from None
        finally:
            for job in jobs:
                job.cancel()

    async def open_stream(
        self, request: GenerationRequest
    ) -> tuple[StreamDelta, AsyncIterator[StreamDelta]]:
        """Start a stream and wait for its first delta, so that queue-full, closed-engine and
        timeout errors are still answered as HTTP errors before any event is sent. The rest
        of the stream stays under the same request deadline (ApiError 504 past it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        stream = self.engine.stream(request)
        try:
            first = await asyncio.wait_for(anext(aiter(stream)), self.settings.request_timeout_s)
        except TimeoutError:
            await close_stream(stream)
            raise self._timeout() from None
        except BaseException:
            await close_stream(stream)
            raise
        return first, self._bounded(stream, deadline)

    async def _bounded(
        self, stream: AsyncIterator[StreamDelta], deadline: float
    ) -> AsyncIterator[StreamDelta]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    delta = await asyncio.wait_for(anext(stream), deadline - loop.time())
                except StopAsyncIteration:
                    return
                yield delta
        except TimeoutError:
            raise self._timeout() from None
        finally:
            await close_stream(stream)

    def _timeout(self) -> ApiError:
        limit = self.settings.request_timeout_s
        return ApiError(504, "timeout", f"the request took longer than {limit:g} s")


async def close_stream(stream: AsyncIterator[StreamDelta]) -> None:
    """``aclose()`` the stream if it has one (an async generator does)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"
