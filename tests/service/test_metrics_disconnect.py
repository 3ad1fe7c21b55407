"""Metrics after a known workload (continuous engine), rows of a client that went away are
freed, and the full queue's Retry-After follows the measured drain rate."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from prompts import Backbone
from service.app import create_app
from service.engine.drain import MAX_RETRY_S, DrainRate
from service.handlers.generation import ClientGone
from service.protocol.generate import GenerationParameters
from service.settings import Settings
from tests.service.conftest import (
    shared_body,
    shared_prompt,
    task_body,
    write_overflowing_task,
)

LIMIT = 400


@pytest.fixture
def client(tiny_t5_dir: Path, tmp_path: Path, t5_backbone: Backbone) -> Iterator[TestClient]:
    settings = Settings(
        model=str(tiny_t5_dir),
        data_dir=str(tmp_path),
        max_new_tokens_limit=LIMIT,
        max_wait_ms=200,  # a burst is admitted as one batch
        log_level="WARNING",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert c.post("/v1/shared-prompts", json=shared_body(shared_prompt(t5_backbone)))
        for name, seed in (("one", 1), ("two", 2)):
            assert c.post("/v1/tasks", json=task_body(t5_backbone, name, seed=seed)).is_success
        yield c


def scrape(c: TestClient) -> dict[str, float]:
    """Sample name (with labels) → value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" not in s.labels:
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_after_a_known_workload(client: TestClient, t5_backbone: Backbone) -> None:
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    burst = client.post(
        "/v1/tasks/one/generate",
        json={"inputs": ["a b", "c d e", "f", "g h"], "parameters": {"max_new_tokens": 5}},
    ).json()
    write_overflowing_task(client, t5_backbone)
    assert client.post("/v1/tasks/poison/generate", json={"inputs": "x"}).status_code == 422
    m = scrape(client)
    reasons = {r: m.get(f"rankone_finished_requests_total{{reason={r}}}", 0.0) for r in
               ("stop", "length", "error", "cancelled")}  # fmt: skip
    expected = {"stop": 0, "length": 0}
    for out in burst["outputs"]:
        expected[out["finish_reason"]] += 1
    assert reasons == {**expected, "error": 1, "cancelled": 0}
    assert m["rankone_generated_tokens_total"] == burst["usage"]["completion_tokens"]
    # One task per step in the burst (the poison ran alone): recorded before rows leave, so
    # the step in which the last rows finish counts its task too (never 0 tasks).
    assert m["rankone_batch_tasks_count"] > 0
    assert m["rankone_batch_tasks_sum"] == m["rankone_batch_tasks_count"]
    # The model thread's time by phase: decode steps are part of the steps' time.
    decode = m["rankone_engine_busy_seconds_total{phase=decode}"]
    assert m["rankone_engine_busy_seconds_total{phase=prefill}"] > 0 and decode > 0
    assert decode <= m["rankone_engine_step_seconds_sum"]


def test_a_client_that_went_away_frees_its_rows(client: TestClient) -> None:
    """The handler awaits ``disconnected`` (the route passes ``until_disconnected``): once it
    returns, the client is gone and the rows are cancelled at the next step, long before their
    token limit."""
    app = client.app
    app.state.engine.loop_core.eos_ids = set()  # type: ignore[attr-defined]  # run to the limit
    handler = app.state.generation  # type: ignore[attr-defined]
    params = GenerationParameters(max_new_tokens=LIMIT)
    prepared = client.portal.call(handler.prepare, "two", ["a", "b c", "d", "e f"], params)
    stats = app.state.engine.loop_core.stats  # type: ignore[attr-defined]
    before = stats.generated

    async def disconnected() -> None:  # gone once its rows are decoding
        while stats.generated - before <= 20:
            await asyncio.sleep(0.01)

    async def run() -> None:
        await handler.run(prepared, disconnected)

    with pytest.raises(ClientGone):
        client.portal.call(run)

    async def settle() -> None:
        for _ in range(200):
            engine = app.state.engine  # type: ignore[attr-defined]
            if engine.running == 0 and engine.queue_depth == 0:
                return
            await asyncio.sleep(0.05)

    client.portal.call(settle)
    m = scrape(client)
    assert m["rankone_finished_requests_total{reason=cancelled}"] == 4
    assert m["rankone_generated_tokens_total"] < 4 * LIMIT / 2


def test_drain_rate_and_retry_after() -> None:
    now = [0.0]
    rate = DrainRate(window_s=10.0, clock=lambda: now[0])
    assert rate.retry_after_s(50) == 10  # nothing measured yet: one window
    for _ in range(20):  # 20 requests over 10 s: 2 per second
        now[0] += 0.5
        rate.record()
    assert rate.rate() == pytest.approx(2.0)
    assert rate.retry_after_s(10) == 5
    assert rate.retry_after_s(1) == 1
    assert rate.retry_after_s(10_000) == MAX_RETRY_S
    now[0] += 30  # the window empties
    assert rate.rate() == 0.0
