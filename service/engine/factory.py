"""Build the configured engine; engines are imported lazily so a missing one fails loudly."""

from __future__ import annotations

from typing import Any

from prompts.backbone import Backbone
from service.engine.base import Engine
from service.engine.threads import model_thread_count
from service.metrics import EngineMetrics

ENGINES = ("continuous", "static")


def build_engine(name: str, backbone: Backbone, settings: Any, metrics: EngineMetrics) -> Engine:
    """``settings``: the server Settings (batch limits, wait time, queue size, threads)."""
    threads = model_thread_count(settings.threads)
    if name == "static":
        from service.engine.static import StaticBatchEngine

        return StaticBatchEngine(
            backbone,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            metrics=metrics,
            threads=threads,
        )
    if name == "continuous":
        from service.engine.continuous import ContinuousEngine

        return ContinuousEngine(
            backbone,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            prefix_cache_bytes=settings.prefix_cache_bytes,
            fused_forward=settings.fused_forward,
            weights=settings.weights,
            cuda_graphs=settings.cuda_graphs,
            compiled_step=settings.compiled_step,
            cpu_kernels=settings.cpu_kernels,
            threads=threads,
            metrics=metrics,
        )
    raise ValueError(f"unknown engine {name!r}; use one of {ENGINES}")
