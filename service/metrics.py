"""Prometheus metrics, one ``CollectorRegistry`` per app so tests (and two apps) stay apart.

``EngineMetrics`` is the small surface an engine reports through; it knows nothing of HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class EngineMetrics:
    """What an engine reports: batch sizes, generated tokens, queue depth, running rows."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            "rankone_batch_size",
            "Rows per forward batch",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.batch_tasks = Histogram(
            "rankone_batch_tasks",
            "Distinct tasks per forward batch",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "rankone_generated_tokens", "Tokens generated", registry=registry
        )
        self.prompt_tokens = Counter(
            "rankone_prompt_tokens", "Input tokens processed", registry=registry
        )
        self.step_seconds = Histogram(
            "rankone_engine_step_seconds",
            "Seconds per engine step (one generate call or one decode step)",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.busy_seconds = Counter(
            "rankone_engine_busy_seconds",
            "Seconds the engine's model thread spent prefilling admitted rows and decoding",
            ["phase"],
            registry=registry,
        )
        self.queue_depth = Gauge("rankone_queue_depth", "Requests waiting", registry=registry)
        self.running = Gauge(
            "rankone_running_requests", "Requests in the running batch", registry=registry
        )
        self.finished = Counter(
            "rankone_finished_requests",
            "Finished requests by reason",
            ["reason"],
            registry=registry,
        )

    def observe_batch(self, size: int, tasks: int = 1) -> None:
        self.batch_size.observe(size)
        self.batch_tasks.observe(tasks)

    def observe_step(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    def add_busy(self, phase: str, seconds: float) -> None:
        """``phase``: ``prefill`` (admission) or ``decode`` (decode steps)."""
        self.busy_seconds.labels(phase=phase).inc(seconds)

    def add_tokens(self, n: int) -> None:
        self.generated_tokens.inc(n)

    def add_prompt_tokens(self, n: int) -> None:
        self.prompt_tokens.inc(n)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def set_running(self, n: int) -> None:
        self.running.set(n)

    def finish(self, reason: str) -> None:
        self.finished.labels(reason=reason).inc()


class Metrics:
    """All metrics of one app: HTTP, engine, store."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rankone_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rankone_http_request_seconds",
            "HTTP latency by route",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.store_errors = Counter(
            "rankone_store_errors", "Factor store failures", registry=self.registry
        )
        self.engine = EngineMetrics(self.registry)
        self._cache_hits = Gauge(
            "rankone_device_cache_hits", "Device-cache hits (since start)", registry=self.registry
        )
        self._cache_misses = Gauge(
            "rankone_device_cache_misses",
            "Device-cache misses (since start)",
            registry=self.registry,
        )
        self._cache_bytes = Gauge(
            "rankone_device_cache_bytes", "Bytes held by the device cache", registry=self.registry
        )
        self._cache_stats: Callable[[], Any] | None = None

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.latency.labels(method=method, route=route).observe(seconds)

    def watch_cache(self, stats: Callable[[], Any]) -> None:
        """``stats()`` returns the store's cache stats (an object or dict with hits/misses)."""
        self._cache_stats = stats

    def render(self) -> tuple[bytes, str]:
        if self._cache_stats is not None:
            stats = self._cache_stats()
            for gauge, key in (
                (self._cache_hits, "hits"),
                (self._cache_misses, "misses"),
                (self._cache_bytes, "bytes"),
            ):
                value = stats.get(key) if isinstance(stats, dict) else getattr(stats, key, None)
                if isinstance(value, int | float):
                    gauge.set(value)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
