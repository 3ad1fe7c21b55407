"""The generation handler: resolve the task, merge its defaults, check limits, tokenize, and
submit one engine request per input (concurrently), under the request deadline."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
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
from service.handlers.events import ServerEvent
from service.logging import request_id_var
from service.metrics import TaskTraffic
from service.protocol.generate import (
    GenerateResponse,
    GenerationParameters,
    Output,
    TokenEvent,
    Usage,
)
from service.settings import Settings

# Returns once the client has gone (the route passes ``service.deps.until_disconnected``).
Disconnected = Callable[[], Awaitable[object]]


class ClientGone(ApiError):
    """The client closed the connection before its answer was ready (logged as 499)."""

    def __init__(self) -> None:
        super().__init__(499, "client_closed", "the client closed the connection")


@dataclass
class Prepared:
    task: ResolvedTask
    requests: list[GenerationRequest]


def generate_response(prepared: Prepared, results: list[GenerationResult]) -> GenerateResponse:
    """The native route's reply: the task and version that answered, texts and outputs."""
    outs, usage = outputs(results)
    return GenerateResponse(
        task=prepared.task.name,
        version=prepared.task.version,
        texts=[o.text for o in outs],
        outputs=outs,
        usage=usage,
    )


async def token_events(
    first: StreamDelta, stream: AsyncIterator[StreamDelta]
) -> AsyncIterator[ServerEvent]:
    """The native stream: ``token`` events carry new text; ``done`` carries the whole output."""
    delta: StreamDelta | None = first
    try:
        while delta is not None:
            if delta.text or delta.token_ids:
                yield ServerEvent(TokenEvent(text=delta.text, token_ids=delta.token_ids), "token")
            if delta.result is not None:
                (out,), _ = outputs([delta.result])
                yield ServerEvent(out, "done")
                return
            delta = await anext(stream, None)
    finally:
        await close_stream(stream)


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
    def __init__(
        self,
        store: Any,
        engine: Engine,
        backbone: Backbone,
        settings: Settings,
        traffic: TaskTraffic | None = None,
    ) -> None:
        self.store = store
        self.engine = engine
        self.backbone = backbone
        self.settings = settings
        self.traffic = traffic
        self.positions = backbone.max_positions
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
        if not self.store.is_base(task_name):  # the base model's id need not be a task name
            check_name(task_name, "task name")
        # the task's default parameters come with its factors, from the store's device cache
        task, defaults = await self.store.resolve_with_defaults(task_name)
        merged = params.merged_over(defaults)
        sampling = self._sampling(merged)
        base = request_id_var.get()
        loop = asyncio.get_running_loop()
        token_ids = await loop.run_in_executor(self._tokenizer_thread, encode)
        queue = self.settings.queue_size
        if len(token_ids) > queue:  # a 429 would never clear: each row takes a queue place
            raise ApiError(
                422,
                "too_many_inputs",
                f"this request has {len(token_ids)} inputs (or choices), but the server's queue "
                f"holds {queue} at most (RANKONE_QUEUE_SIZE): send at most {queue} per request",
            )
        explicit = params.max_new_tokens is not None
        requests = [
            GenerationRequest(
                request_id=f"{base}-{i}" if len(token_ids) > 1 else base,
                task=task,
                input_ids=ids,
                params=self._fit_positions(task, ids, sampling, explicit=explicit),
            )
            for i, ids in enumerate(token_ids)
        ]
        return Prepared(task, requests)

    def _fit_positions(
        self, task: ResolvedTask, ids: list[int], sampling: SamplingParams, *, explicit: bool
    ) -> SamplingParams:
        """Refuse (422, with the numbers) what cannot fit the model's position table; lower a
        defaulted ``max_new_tokens`` to what fits. The last new token is never fed back, so
        ``L + T + n - 1`` positions serve ``n`` new tokens."""
        length, n = int(task.prompt.shape[0]), sampling.max_new_tokens
        if length + len(ids) == 0:
            raise ApiError(
                422,
                "empty_input",
                "the base model has no prompt rows to continue from: send a non-empty input",
            )
        table = self.positions
        if table is None:
            return sampling
        used = length + len(ids)
        if used > table:
            raise ApiError(
                422,
                "input_too_long",
                f"the task's prompt ({length} rows) + the input ({len(ids)} tokens) take {used} "
                f"positions; the model has {table}: shorten the input by {used - table} tokens",
            )
        room = table - used + 1
        if n <= room:
            return sampling
        if explicit:
            raise ApiError(
                422,
                "max_new_tokens_too_large",
                f"the task's prompt ({length} rows) + the input ({len(ids)} tokens) + "
                f"max_new_tokens={n} need {used + n - 1} positions; the model has {table}: "
                f"ask for at most {room} new tokens",
            )
        return dataclasses.replace(sampling, max_new_tokens=room)

    async def run(
        self, prepared: Prepared, disconnected: Disconnected | None = None
    ) -> list[GenerationResult]:
        """All inputs concurrently; if one fails (queue full, timeout) the rest are cancelled.

        ``disconnected`` (the route passes ``until_disconnected(request)``) is awaited while
        the rows run: once the client has gone, its rows are cancelled (their batch slots are
        freed at the next step) and ``ClientGone`` is raised.
        """
        jobs = [asyncio.ensure_future(self.engine.generate(r)) for r in prepared.requests]
        gathered = asyncio.gather(*jobs)
        gathered.add_done_callback(_retrieve)  # its error is read even when nobody awaits it
        watcher = asyncio.ensure_future(disconnected()) if disconnected else None
        waits: set[asyncio.Future[Any]] = {gathered}
        if watcher is not None:
            waits.add(watcher)
        try:
            done, _ = await asyncio.wait(
                waits, timeout=self.settings.request_timeout_s, return_when="FIRST_COMPLETED"
            )
            if gathered in done:
                results = list(gathered.result())
                for result in results:
                    self._ok(prepared.task.name, result)
                return results
            if watcher is not None and watcher in done:
                raise ClientGone()
            raise self._timeout()
        except BaseException:
            self._error(prepared.task.name, len(prepared.requests))
            raise
        finally:
            for job in waits | set(jobs):
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
            self._error(request.task.name)
            await close_stream(stream)
            raise self._timeout() from None
        except BaseException:
            self._error(request.task.name)
            await close_stream(stream)
            raise
        if first.result is not None:
            self._ok(request.task.name, first.result)
        return first, self._bounded(stream, deadline, request.task.name, first.result is None)

    async def _bounded(
        self, stream: AsyncIterator[StreamDelta], deadline: float, task: str, counting: bool
    ) -> AsyncIterator[StreamDelta]:
        """The rest of a stream under ``deadline``; while ``counting``, its outcome is counted
        in the task's traffic (a stream closed before its result counts as an error)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    delta = await asyncio.wait_for(anext(stream), deadline - loop.time())
                except StopAsyncIteration:
                    return
                if counting and delta.result is not None:
                    counting = False
                    self._ok(task, delta.result)
                yield delta
        except TimeoutError:
            raise self._timeout() from None
        finally:
            if counting:
                self._error(task)
            await close_stream(stream)

    def _ok(self, task: str, result: GenerationResult) -> None:
        if self.traffic is not None:
            self.traffic.ok(task, result.prompt_tokens, result.completion_tokens)

    def _error(self, task: str, count: int = 1) -> None:
        if self.traffic is not None:
            self.traffic.error(task, count)

    def _timeout(self) -> ApiError:
        limit = self.settings.request_timeout_s
        return ApiError(504, "timeout", f"the request took longer than {limit:g} s")


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def close_stream(stream: AsyncIterator[StreamDelta]) -> None:
    """``aclose()`` the stream if it has one (an async generator does)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"
