"""The static batching engine: each round takes the waiting requests of any task, groups the
ones that can share one ``model.generate`` call, and runs it in the single model thread.

Simpler than continuous batching (a batch runs to its longest row), and a correctness
reference for it: greedy float32 rows equal ``generate`` run alone with the composed prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prompts.backbone import Backbone
from service.engine.base import (
    Engine,
    EngineClosedError,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    StreamDelta,
)
from service.engine.drain import DrainRate
from service.engine.static_batch import group_key, run_group
from service.engine.threads import enter_model_thread
from service.metrics import EngineMetrics

log = logging.getLogger("rankone.engine")


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future[GenerationResult] = field(repr=False)


class StaticBatchEngine(Engine):
    def __init__(
        self,
        backbone: Backbone,
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        metrics: EngineMetrics | None = None,
        threads: int = 0,
    ) -> None:
        """``threads``: torch threads of the model thread (0: leave torch's setting)."""
        self.backbone = backbone
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.metrics = metrics
        self._queue: asyncio.Queue[_Pending] | None = None
        self._queue_size = queue_size
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="rankone-model",
            initializer=enter_model_thread,
            initargs=(threads,),
        )
        self._closed = False
        self._running = 0
        self.drain = DrainRate()

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def running(self) -> int:
        return self._running

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self._queue_size)
        self._worker = asyncio.create_task(self._loop(), name="rankone-static-engine")

    async def shutdown(self, *, drain_timeout_s: float = 30.0) -> None:
        self._closed = True
        deadline = time.monotonic() + drain_timeout_s
        while (self.queue_depth or self._running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(EngineClosedError("the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self._closed or self._queue is None:
            raise EngineClosedError("the server is shutting down; no new requests")
        pending = _Pending(request, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            depth = self._queue.qsize()
            raise QueueFullError(depth, retry_after_s=self.drain.retry_after_s(depth)) from None
        self._report()
        try:
            return await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            pending.future.cancel()  # skipped by the worker if still waiting
            raise

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        # A static batch finishes all at once: the stream is one delta with the whole result.
        result = await self.generate(request)
        yield StreamDelta(text=result.text, token_ids=result.token_ids, result=result)

    def _report(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.queue_depth)
            self.metrics.set_running(self._running)

    async def _take_batch(self) -> list[_Pending]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            timeout = deadline - time.monotonic()
            if self._queue.empty() and timeout <= 0:
                break
            try:
                batch.append(
                    self._queue.get_nowait()
                    if not self._queue.empty()
                    else await asyncio.wait_for(self._queue.get(), timeout)
                )
            except TimeoutError:
                break
        return [p for p in batch if not p.future.done()]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take_batch()
            if not batch:
                continue
            self._running = len(batch)
            self._report()
            groups: dict[object, list[_Pending]] = {}
            for pending in batch:
                groups.setdefault(group_key(pending.request), []).append(pending)
            try:
                for group in groups.values():
                    await self._run_group(loop, group)
            finally:
                self._running = 0
                self._report()

    async def _run_group(self, loop: asyncio.AbstractEventLoop, group: list[_Pending]) -> None:
        """One ``generate`` call for ``group``; if it raises, each row runs alone, so that a
        failure ends only the rows that fail by themselves."""
        requests = [p.request for p in group if not p.future.done()]
        if not requests:
            return
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, run_group, self.backbone, requests)
        except Exception as exc:
            if len(requests) == 1:
                log.exception("generation failed for request %s", requests[0].request_id)
                results = [exc]
            else:
                log.warning("a batch of %d failed; running its rows alone", len(requests))
                results = [await self._run_alone(loop, r) for r in requests]
        self._observe(requests, results, time.perf_counter() - started)
        by_request = {id(req): res for req, res in zip(requests, results, strict=True)}
        for p in group:
            result = by_request.get(id(p.request))
            if result is None or p.future.done():
                continue
            if isinstance(result, Exception):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)

    async def _run_alone(
        self, loop: asyncio.AbstractEventLoop, request: GenerationRequest
    ) -> GenerationResult | Exception:
        try:
            return (
                await loop.run_in_executor(self._executor, run_group, self.backbone, [request])
            )[0]
        except Exception as exc:
            log.exception("generation failed for request %s", request.request_id)
            return exc

    def _observe(
        self,
        requests: list[GenerationRequest],
        results: list[GenerationResult | Exception],
        seconds: float,
    ) -> None:
        self.drain.record(len(results))
        if self.metrics is None:
            return
        done = [r for r in results if isinstance(r, GenerationResult)]
        self.metrics.observe_batch(len(requests), len({r.task.name for r in requests}))
        self.metrics.observe_step(seconds)
        self.metrics.add_tokens(sum(r.completion_tokens for r in done))
        self.metrics.add_prompt_tokens(sum(len(r.input_ids) for r in requests))
        for r in results:
            self.metrics.finish(r.finish_reason if isinstance(r, GenerationResult) else "error")
