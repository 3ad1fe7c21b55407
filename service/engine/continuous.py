"""The continuous-batching engine: one model thread, rows joining and leaving at every step.

The asyncio side only enqueues rows (under a lock) and awaits their deltas; a dedicated thread
owns the model and runs ``DecodeLoop``: at each step boundary it frees cancelled rows, admits
waiting requests of any task in FIFO order (up to ``max_batch_size`` rows and
``max_batch_tokens`` tokens of prompt + input + max new tokens), prefills them, and decodes one
token for every running row. Deltas cross back to the event loop with
``loop.call_soon_threadsafe``.

Decoder-only backbones reuse each task's prompt KV prefix (``PrefixCache``, keyed by task name
and version); wire ``invalidate`` to the factor store's events so replaced or deleted tasks
are dropped. Seq2seq backbones re-encode ``[prompt; input]`` per request (bidirectional
encoder: nothing of the prompt is input-independent).

Finish reasons: ``"stop"`` for EOS and stop strings (OpenAI semantics; ``"eos"`` is not used),
``"length"`` at ``max_new_tokens``, ``"cancelled"`` when the stream's consumer went away or a
shutdown timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from prompts.backbone import Backbone
from service.engine.base import (
    Engine,
    EngineClosedError,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    StreamDelta,
)
from service.engine.decode import DecodeLoop, Row
from service.engine.drain import DrainRate
from service.engine.forwards import choose_forward
from service.engine.kv_layout import admission_count
from service.engine.prefix_cache import PrefixCache
from service.engine.threads import enter_model_thread

log = logging.getLogger("rankone.engine")

_DONE = object()


class ContinuousEngine(Engine):
    """Continuous batching over one frozen backbone (see the module docstring)."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        queue_size: int = 256,
        prefix_cache_bytes: int = 256 << 20,
        metrics: Any = None,
        max_wait_ms: float = 0.0,
        seed: int = 0,
        fused_forward: bool = True,
        weights: str = "float32",
        cuda_graphs: bool = True,
        compiled_step: bool = False,
        cpu_kernels: bool = True,
        threads: int = 0,
    ) -> None:
        """``threads``: torch threads of the model thread (0: leave torch's setting)."""
        if max_batch_size < 1 or max_batch_tokens < 1 or queue_size < 1:
            raise ValueError(
                f"max_batch_size, max_batch_tokens and queue_size must be >= 1; got "
                f"{max_batch_size}, {max_batch_tokens}, {queue_size}"
            )
        self.backbone = backbone
        self.threads = threads
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.queue_size = queue_size
        # Only an idle engine waits (up to this long) for a burst to fill the first batch;
        # a running batch admits newcomers at its next step anyway.
        self.max_wait_s = max_wait_ms / 1000
        self.metrics = metrics
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.loop_core = DecodeLoop(
            backbone,
            prefix_cache=self.prefix_cache,
            seed=seed,
            max_rows=max_batch_size,
            # chosen once, here
            forward=choose_forward(
                backbone,
                fused=fused_forward,
                weights=weights,
                graphs=cuda_graphs,
                compiled=compiled_step,
                kernels=cpu_kernels,
            ),
        )
        self.drain = DrainRate()
        self._waiting: deque[Row] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._stop = False
        self._abort = False
        self._thread: threading.Thread | None = None
        self._prepared = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- Engine interface ------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self.loop_core.running

    @property
    def forward_kind(self) -> str:
        """The forward that runs the backbone: ``fused``, ``fused-int8``, ``fused-int4``,
        ``fused-bf16``, ``fused-f32-packed`` (each with ``+compiled`` where its decode steps
        run compiled, ``+graphs`` where they replay CUDA graphs) or ``hf``
        (``forward.Forward.kind``)."""
        return self.loop_core.forward.kind

    @property
    def forward_kernels(self) -> str:
        """Whose kernels run the forward's products of a few rows: ``rankone`` or ``torch``
        (``forward.Forward.products_by``)."""
        return self.loop_core.forward.products_by()

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="rankone-engine", daemon=True)
        self._thread.start()
        # ready once the forward has prepared (its timings; a compiled step's compile): no
        # request waits behind it
        await asyncio.to_thread(self._prepared.wait)

    async def shutdown(self, *, drain_timeout_s: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + drain_timeout_s
        while (
            (self._waiting or self.loop_core.running)
            and self._thread is not None
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.01)
        with self._cond:
            self._abort = bool(self._waiting or self.loop_core.running)
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        else:  # never started: nothing will ever run what is waiting
            with self._cond:
                self._abort_all()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        stream = self.stream(request, streaming=False)
        try:
            async for delta in stream:
                if delta.result is not None:
                    return delta.result
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        raise RuntimeError(f"request {request.request_id} ended without a result")

    def stream(
        self, request: GenerationRequest, *, streaming: bool = True
    ) -> AsyncIterator[StreamDelta]:
        """Enqueue now (QueueFullError / EngineClosedError raise here) and stream its deltas
        (``streaming=False``: only the last one, which carries the result)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(delta: StreamDelta) -> None:
            if delta.result is not None:
                self._finished(delta.result.finish_reason)
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        def fail(exc: BaseException) -> None:
            self._finished("error")
            loop.call_soon_threadsafe(queue.put_nowait, exc)

        row = Row(request=request, emit=emit, fail=fail, streaming=streaming)
        self._submit(row)
        return self._deltas(row, queue)

    async def _deltas(self, row: Row, queue: asyncio.Queue[Any]) -> AsyncIterator[StreamDelta]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.result is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self._cancel(row)

    def _finished(self, reason: str) -> None:
        """A row left (any thread): count it by reason and in the drain rate."""
        self.drain.record()
        if self.metrics:
            self.metrics.finish(reason)

    # -- cache invalidation ----------------------------------------------------------------

    def invalidate(self, task_name: str | None = None) -> int:
        """Drop cached prompt prefixes of one task (all versions), or of all tasks (None).

        Wire to the factor store: ``put``/``delete`` of a task → ``invalidate(name)``; a
        shared-prompt change or ``reset`` → ``invalidate(None)``.
        """
        return self.prefix_cache.invalidate(task_name) if self.prefix_cache is not None else 0

    def on_store_event(self, event: Any) -> None:
        """A ready-made store listener (``store.add_listener(engine.on_store_event)``)."""
        if getattr(event, "kind", None) == "task" and getattr(event, "action", None) != "reset":
            self.invalidate(event.name)
        else:
            self.invalidate(None)

    # -- submission (event-loop side) -------------------------------------------------------

    def _submit(self, row: Row) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            if len(self._waiting) >= self.queue_size:
                depth = len(self._waiting)
                raise QueueFullError(depth, retry_after_s=self.drain.retry_after_s(depth))
            self._waiting.append(row)
            self._cond.notify()
        if self.metrics:
            self.metrics.set_queue_depth(len(self._waiting))

    def _cancel(self, row: Row) -> None:
        row.cancel()
        with self._cond:
            self._cond.notify()

    # -- the model thread --------------------------------------------------------------------

    def _run(self) -> None:
        enter_model_thread(self.threads)
        core = self.loop_core
        try:
            core.prepare()
        finally:
            self._prepared.set()
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not core.running:
                    self._cond.wait()
                if self._abort:
                    self._abort_all()
                    return
                if self._stop and not self._waiting and not core.running:
                    return
                self._gather_burst()
                admitted = self._take_admissible()
            try:
                start = time.perf_counter()
                generated_before = core.stats.generated  # admission chooses first tokens too
                prefill_before, decode_before = core.stats.prefill_s, core.stats.decode_s
                core.drop_cancelled()
                if admitted:
                    core.admit(admitted)
                    if self.metrics:
                        self.metrics.add_prompt_tokens(
                            sum(len(r.request.input_ids) for r in admitted)
                        )
                # The step's batch as it enters the step: rows that finish in it leave at its end.
                tasks = len({r.request.task.name for r in core.rows})
                batch = core.step()
                if self.metrics:
                    self.metrics.add_tokens(core.stats.generated - generated_before)
                    # the loop's own clocks: its prefill forwards and its decode steps
                    self.metrics.add_busy("prefill", core.stats.prefill_s - prefill_before)
                    self.metrics.add_busy("decode", core.stats.decode_s - decode_before)
                    if batch:
                        self.metrics.observe_batch(batch, tasks)
                        self.metrics.observe_step(time.perf_counter() - start)
                    self.metrics.set_running(core.running)
                    self.metrics.set_queue_depth(len(self._waiting))
            except Exception as exc:  # a decode forward failed: no row is to blame, end them all
                log.exception("engine step failed")
                for row in admitted:
                    if not row.finished:
                        row.finished = True
                        row.fail(exc)
                core.abort(exc)

    def _gather_burst(self) -> None:
        """On an idle engine, wait up to ``max_wait_s`` for a full batch (called under the lock)."""
        if self.loop_core.running or self._stop or self.max_wait_s <= 0:
            return
        deadline = time.monotonic() + self.max_wait_s
        while len(self._waiting) < self.max_batch_size and not self._stop:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _take_admissible(self) -> list[Row]:
        """Pop the FIFO head of the waiting queue that fits the batch (called under the lock)."""
        core = self.loop_core
        cancelled = []
        while self._waiting and self._waiting[0].cancelled:
            cancelled.append(self._waiting.popleft())
        if cancelled:
            core.admit(cancelled)  # ends them as "cancelled" without running them
        n = admission_count(
            [row.cost for row in self._waiting],
            running_rows=core.running,
            running_tokens=core.running_tokens,
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
        )
        return [self._waiting.popleft() for _ in range(n)]

    def _abort_all(self) -> None:
        """Shutdown timed out: end everything still waiting or running as cancelled."""
        for row in self._waiting:
            row.cancel()
        with contextlib.suppress(Exception):
            self.loop_core.admit(list(self._waiting))
        self._waiting.clear()
        self.loop_core.abort()
