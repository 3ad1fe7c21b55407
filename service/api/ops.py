"""Operations routes (open): liveness, readiness, metrics, and the server's info."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from service.api.errors import error_response
from service.api.responses import KEYED, errors
from service.deps import ClientCaller, MetricsDep, StateDep
from service.protocol.errors import Status

METRICS = "Prometheus text exposition format"

router = APIRouter(tags=["operations"])


@router.get("/healthz", responses=errors())
async def healthz() -> Status:
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses=errors())
async def readyz(state: StateDep) -> JSONResponse:
    if not getattr(state, "ready", False) or getattr(state, "draining", False):
        return error_response(503, "not_ready", "the server is starting or shutting down")
    try:
        store_ok = bool(await state.store.ping())
    except Exception:
        store_ok = False
    if not store_ok:
        return error_response(503, "not_ready", "the factor store is unreachable")
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": METRICS},
        **errors(),
    },
)
async def metrics(metrics: MetricsDep, state: StateDep) -> Response:
    engine = getattr(state, "engine", None)
    if engine is not None:
        metrics.engine.set_queue_depth(engine.queue_depth)
        metrics.engine.set_running(engine.running)
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/info", responses=errors(*KEYED))
async def info(state: StateDep, caller: ClientCaller) -> dict[str, Any]:
    s = state.settings
    bb = state.backbone
    return {
        "backbone": {
            "name": bb.name,
            "fingerprint": bb.fingerprint,
            "kind": bb.kind,
            "d": bb.dim,
            "dtype": str(bb.dtype).removeprefix("torch."),
            "device": str(bb.device),
        },
        "limits": {
            "max_input_tokens": s.max_input_tokens,
            "max_new_tokens": s.max_new_tokens_limit,
            "max_batch_size": s.max_batch_size,
            "max_batch_tokens": s.max_batch_tokens,
            "queue_size": s.queue_size,
            "max_rank": s.max_rank,
            "max_prompt_length": s.max_prompt_length,
            "max_body_bytes": s.max_body_bytes,
            "max_positions": state.generation.positions,
            "request_timeout_s": s.request_timeout_s,
        },
        "store": getattr(state.store, "kind", "unknown"),
        "engine": s.engine,
        "forward": getattr(getattr(state, "engine", None), "forward_kind", "hf"),
        "kernels": getattr(getattr(state, "engine", None), "forward_kernels", "torch"),
    }
