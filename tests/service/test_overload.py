"""Overload and deadlines: a full queue answers 429 with Retry-After; a slow request 504."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import service.engine.static as static_engine
from prompts import Backbone
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import shared_body, shared_prompt, task_body


@pytest.fixture
def slow_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow down the static engine's model call; the tests below select that engine."""
    real = static_engine.run_group

    def slow(*args: Any) -> Any:
        time.sleep(0.4)
        return real(*args)

    monkeypatch.setattr(static_engine, "run_group", slow)


def static_settings(model: Path, data: Path, **overrides: Any) -> Settings:
    """Settings for the slowed static engine (see ``slow_engine``)."""
    return Settings(
        model=str(model), data_dir=str(data), engine="static", log_level="WARNING", **overrides
    )


async def _serve(
    settings: Settings, bb: Backbone, calls: int, body: dict[str, Any]
) -> list[httpx.Response]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            assert (
                await c.post("/v1/shared-prompts", json=shared_body(shared_prompt(bb)))
            ).status_code == 201
            assert (
                await c.post("/v1/tasks", json=task_body(bb, "busy", seed=0))
            ).status_code == 201
            return await asyncio.gather(
                *(c.post("/v1/tasks/busy/generate", json=body) for _ in range(calls))
            )


def test_full_queue_answers_429_with_retry_after(
    slow_engine: None, tiny_t5_dir: Path, tmp_path: Path, t5_backbone: Backbone
) -> None:
    settings = static_settings(tiny_t5_dir, tmp_path, queue_size=1, max_batch_size=1, max_wait_ms=0)
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    responses = asyncio.run(_serve(settings, t5_backbone, 6, body))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            assert "queue is full" in r.json()["error"]["message"]


def test_list_inputs_over_the_queue_are_refused_whole(
    slow_engine: None, tiny_t5_dir: Path, tmp_path: Path, t5_backbone: Backbone
) -> None:
    settings = static_settings(tiny_t5_dir, tmp_path, queue_size=1, max_batch_size=1, max_wait_ms=0)
    body = {"inputs": ["a", "b", "c", "d"], "parameters": {"max_new_tokens": 2}}
    (r,) = asyncio.run(_serve(settings, t5_backbone, 1, body))
    # more inputs than the queue holds can never be queued: a 422 saying why, not a 429 whose
    # Retry-After would be a lie (issue 22)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "too_many_inputs" and "retry-after" not in r.headers


def test_request_timeout_is_504(
    slow_engine: None, tiny_t5_dir: Path, tmp_path: Path, t5_backbone: Backbone
) -> None:
    settings = static_settings(tiny_t5_dir, tmp_path, request_timeout_s=0.1)
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    (r,) = asyncio.run(_serve(settings, t5_backbone, 1, body))
    assert r.status_code == 504 and "0.1 s" in r.json()["error"]["message"]
