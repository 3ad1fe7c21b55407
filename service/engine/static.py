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
from service.engine.static_batch import group_key, run_group
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
    ) -> None:
        self.backbone = backbone
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.metrics = metrics
        self._queue: asyncio.Queue[_Pending] | None = None
        self._queue_size = queue_size
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rankone-model")
        self._closed = False
        self._running = 0

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
            raise QueueFullError(self._queue.qsize(), retry_after_s=1.0) from None
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
                    requests = [p.request for p in group if not p.future.done()]
                    if not requests:
                        continue
                    started = time.perf_counter()
                    try:
                        results = await loop.run_in_executor(
                            self._executor, run_group, self.backbone, requests
                        )
                    except Exception as e:  # a bad batch fails its rows, not the engine
                        log.exception("generation failed for a batch of %d", len(requests))
                        for p in group:
                            if not p.future.done():
                                p.future.set_exception(e)
                        continue
                    self._observe(requests, results, time.perf_counter() - started)
                    live = [p for p in group if not p.future.done()]
                    for p, result in zip(live, _align(group, requests, results), strict=True):
                        p.future.set_result(result)
            finally:
                self._running = 0
                self._report()

    def _observe(
        self, requests: list[GenerationRequest], results: list[GenerationResult], seconds: float
    ) -> None:
        if self.metrics is None:
            return
        self.metrics.observe_batch(len(requests), len({r.task.name for r in requests}))
        self.metrics.observe_step(seconds)
        self.metrics.add_tokens(sum(r.completion_tokens for r in results))
        self.metrics.add_prompt_tokens(sum(r.prompt_tokens for r in results))
        for r in results:
            self.metrics.finish(r.finish_reason)


def _align(
    group: list[_Pending], requests: list[GenerationRequest], results: list[GenerationResult]
) -> list[GenerationResult]:
    """Results of the rows still waiting (some may have been cancelled while running)."""
    by_request = {id(req): res for req, res in zip(requests, results, strict=True)}
    return [
        by_request[id(p.request)]
        for p in group
        if not p.future.done() and id(p.request) in by_request
    ]
