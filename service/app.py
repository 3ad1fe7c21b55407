"""The FastAPI app: ``create_app(settings)``, and ``app`` for ``uvicorn service.app:app``.

The lifespan loads the backbone once, opens the factor store (Redis, or the embedded
directory store when no Redis URL is set), seeds it, starts the engine, and on shutdown
refuses new work (503), drains in-flight requests and closes the store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI

from prompts.backbone import Backbone, load_backbone, prompt_norm_bound, resolve_dtype
from service.api import (
    admin,
    chat,
    console,
    docs,
    errors,
    files,
    fine_tuning,
    generate,
    openai,
    ops,
)
from service.api.edge import check_client_text
from service.api.middleware import ServiceMiddleware
from service.api.responses import add_stream_models
from service.auth import describe_scopes
from service.engine.factory import build_engine
from service.engine.threads import release as release_threads
from service.engine.threads import reserve_for_model
from service.handlers.files import FilesHandler
from service.handlers.fine_tuning import FineTuningHandler
from service.handlers.generation import GenerationHandler
from service.handlers.registry import RegistryHandler
from service.handlers.workers import WorkersHandler
from service.jobs.base import JobBackend
from service.jobs.local_worker import LocalWorker
from service.jobs.validation import FileLimits
from service.logging import setup_logging
from service.metrics import Metrics
from service.settings import Settings, load_settings

log = logging.getLogger("rankone.app")
# The longest one shutdown step (closing the store, the jobs) may take before it is left behind.
SHUTDOWN_STEP_S = 10.0


@dataclass
class FineTuning:
    """The fine-tuning handlers over one job backend, and embedded mode's local worker."""

    files: FilesHandler
    jobs: FineTuningHandler
    workers: WorkersHandler
    local_worker: LocalWorker | None


def build_fine_tuning(settings: Settings, registry: RegistryHandler, backbone: Any) -> FineTuning:
    """The job handlers over Redis or the data directory; in embedded mode, its local worker."""
    backend: JobBackend
    if settings.redis_url:
        from service.jobs.redis_backend import RedisJobBackend

        backend = RedisJobBackend(settings.redis_url, **settings.redis_wait)
    else:
        from service.jobs.embedded import EmbeddedJobBackend

        backend = EmbeddedJobBackend(settings.data_dir)
    worker = None
    if not settings.redis_url and settings.finetune_worker == "auto":
        worker = LocalWorker(settings)
    limits = FileLimits(
        settings.finetune_max_file_bytes,
        settings.finetune_max_examples,
        backbone.chat_template is not None,
    )
    files = FilesHandler(backend, limits)
    jobs = FineTuningHandler(
        backend,
        registry,
        files,
        settings,
        on_queued=worker.ensure_running if worker is not None else None,
    )
    return FineTuning(files, jobs, WorkersHandler(jobs), worker)


def build_store(
    settings: Settings, backbone: Backbone, metrics: Metrics, base_model: str = ""
) -> Any:
    from service.store.factor_store import FactorStore

    backend: Any
    if settings.redis_url:
        from service.store.redis_store import RedisBackend

        backend = RedisBackend(settings.redis_url, **settings.redis_wait)
    else:
        from service.store.embedded import EmbeddedBackend

        backend = EmbeddedBackend(settings.data_dir, max_tasks=settings.embedded_max_tasks)
    return FactorStore(
        backend,
        backbone_fingerprint=backbone.fingerprint,
        dim=backbone.dim,
        device=settings.device,
        dtype=resolve_dtype(settings.dtype),
        cache_bytes=settings.device_cache_bytes,
        max_rank=settings.max_rank,
        max_prompt_length=settings.max_prompt_length,
        prompt_norm_bound=prompt_norm_bound(backbone),
        on_store_error=lambda _: metrics.store_errors.inc(),
        base_model=base_model,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    if getattr(state, "settings", None) is None:
        state.settings = load_settings()
    settings: Settings = state.settings
    if not getattr(state, "logging_ready", False):
        setup_logging(settings.log_level, settings.log_format)
    if not settings.admin_keys:
        log.warning(
            "NO ADMIN KEY CONFIGURED: anyone who can reach this server can register, "
            "replace and delete tasks; set RANKONE_ADMIN_KEYS"
        )
    for variable, entries in (
        ("RANKONE_CLIENT_KEYS", settings.client_keys),
        ("RANKONE_ADMIN_KEYS", settings.admin_keys),
    ):
        for line in describe_scopes(entries):  # a scope is never taken silently
            log.info("%s %s", variable, line)
    state.ready, state.draining = False, False
    reserve_for_model()  # the event loop runs torch single-threaded; the model thread gets them
    # `rankone serve` loads it before uvicorn starts, to report a bad RANKONE_MODEL cleanly
    backbone = getattr(state, "preloaded_backbone", None) or load_backbone(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        gguf_cache_dir=settings.gguf_cache_dir or None,
    )
    log.info(
        "backbone loaded",
        extra={"model": backbone.name, "kind": backbone.kind, "fingerprint": backbone.fingerprint},
    )
    metrics: Metrics = state.metrics
    base_model = settings.served_model_name or backbone.served_name
    store = build_store(settings, backbone, metrics, base_model)
    await store.start()
    engine = None
    fine_tuning: FineTuning | None = None
    try:
        if settings.seed_dir:
            await store.seed_from_dir(Path(settings.seed_dir))
        metrics.watch_cache(store.cache_stats)
        engine = build_engine(settings.engine, backbone, settings, metrics.engine)
        prefix_cache = getattr(engine, "prefix_cache", None)
        if prefix_cache is not None:  # the continuous engine on a decoder-only backbone
            metrics.watch_prefix_cache(prefix_cache.stats)
        store.add_listener(engine.on_store_event)
        store.add_listener(
            lambda event: metrics.store_resets.inc() if event.action == "reset" else None
        )
        await engine.start()
        state.backbone, state.store, state.engine = backbone, store, engine
        state.registry = RegistryHandler(store, backbone, settings)
        metrics.tasks.configure(settings.metrics_task_labels)
        state.generation = GenerationHandler(store, engine, backbone, settings, metrics.tasks)
        fine_tuning = build_fine_tuning(settings, state.registry, backbone)
        await fine_tuning.jobs.start()
        state.files, state.fine_tuning = fine_tuning.files, fine_tuning.jobs
        state.workers = fine_tuning.workers
        state.ready = True
        log.info("ready", extra={"engine": settings.engine, "store": store.kind})
        yield
    finally:
        state.ready, state.draining = False, True
        if fine_tuning is not None:
            if fine_tuning.local_worker is not None:
                await fine_tuning.local_worker.stop()  # bounded itself: terminate, then kill
            await bounded("the fine-tuning jobs' close", fine_tuning.jobs.close())
        if engine is not None:
            await engine.shutdown(drain_timeout_s=settings.request_timeout_s)
        if getattr(state, "generation", None) is not None:
            state.generation.close()
        await bounded("the store's close", store.close())
        release_threads()
        log.info("stopped")


async def bounded(what: str, step: Awaitable[None], seconds: float = SHUTDOWN_STEP_S) -> None:
    """One shutdown step, given at most ``seconds``: a close that never returns (a connection
    pool waiting on a lock or a dead peer) is cancelled and left behind, with a warning, so it
    does not hold the process. ``asyncio.wait`` rather than ``wait_for``, which would wait for
    the cancelled step to finish."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        log.warning("shutdown: %s did not finish within %.0f s; going on without it", what, seconds)
        return
    task.result()  # its error, if any, as before


def create_app(settings: Settings | None = None) -> FastAPI:
    """An app for ``settings``; with None, settings are read from the environment at start."""
    app = FastAPI(
        title="rankone",
        version="0.1.0",
        lifespan=lifespan,
        # served by service/api/docs.py, which can close them (RANKONE_DOCS_OPEN=false)
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(check_client_text)],  # the client-text rule, before any body
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    errors.install(app)
    app.add_middleware(ServiceMiddleware)
    for module in (ops, admin, generate, openai, chat, files, fine_tuning, docs):
        app.include_router(module.router)
    document = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document, plus the models that stream events name."""
        if app.openapi_schema is None:
            app.openapi_schema = add_stream_models(document())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    console.mount(app)
    return app


app = create_app()
