"""End to end through real ``rankone serve`` processes on one real redis-server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from prompts import Backbone
from tests.service.conftest import (
    ADMIN,
    ADMIN_KEY,
    CLIENT,
    CLIENT_KEY,
    ServerProcess,
    factors,
    reference_text,
    server_env,
    shared_body,
    shared_prompt,
    task_body,
)

TASKS = ["sentiment", "qa", "summarize", "translate"]
INPUTS = ["hello there", "the quick brown fox", "what is two plus two?", "a"]


@pytest.fixture(scope="module")
def replicas(
    redis_server, tiny_t5_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    """Two server processes on one Redis (started in parallel to save time)."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flushall()
    logs = tmp_path_factory.mktemp("replicas")
    env = server_env(tiny_t5_dir, redis_url=redis_server.url, max_wait_ms=20)
    servers = [ServerProcess(env, logs / f"replica-{i}.log") for i in range(2)]
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def registered(replicas: list[ServerProcess], t5_backbone: Backbone) -> ServerProcess:
    a = replicas[0]
    sp = shared_prompt(t5_backbone)
    r = httpx.post(f"{a.url}/v1/shared-prompts", json=shared_body(sp), headers=ADMIN)
    assert r.status_code == 201, r.text
    for i, name in enumerate(TASKS):
        body = task_body(t5_backbone, name, seed=i, as_blob=i % 2 == 1, description=f"task {name}")
        r = httpx.post(f"{a.url}/v1/tasks", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
    return a


def test_concurrent_mixed_tasks_equal_generate_alone(
    registered: ServerProcess, t5_backbone: Backbone
) -> None:
    sp = shared_prompt(t5_backbone)
    jobs = [(name, text, 6 + 2 * i) for i, name in enumerate(TASKS) for text in INPUTS[:2]]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=registered.url, headers=CLIENT, timeout=60) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        f"/v1/tasks/{name}/generate",
                        json={"inputs": text, "parameters": {"max_new_tokens": n}},
                    )
                    for name, text, n in jobs
                )
            )

    compared = 0
    for (name, text, n), r in zip(jobs, asyncio.run(run()), strict=True):
        assert r.status_code == 200, r.text
        u, v = factors(t5_backbone, seed=TASKS.index(name))
        expected = reference_text(t5_backbone, sp.prompt, u, v, text, n)
        body = r.json()
        if expected is not None:
            compared += 1
            assert body["texts"] == [expected], (name, text)
        assert body["outputs"][0]["prompt_tokens"] == len(t5_backbone.tokenizer(text)["input_ids"])
        assert body["outputs"][0]["completion_tokens"] <= n
    assert compared >= len(jobs) - 2, "too many near ties: pick other test factors"


def test_list_inputs_each_a_request(registered: ServerProcess, t5_backbone: Backbone) -> None:
    r = httpx.post(
        f"{registered.url}/v1/tasks/qa/generate",
        headers=CLIENT,
        timeout=60,
        json={"inputs": INPUTS, "parameters": {"max_new_tokens": 5}},
    )
    assert r.status_code == 200, r.text
    sp = shared_prompt(t5_backbone)
    u, v = factors(t5_backbone, seed=TASKS.index("qa"))
    for got, text in zip(r.json()["texts"], INPUTS, strict=True):
        expected = reference_text(t5_backbone, sp.prompt, u, v, text, 5)
        assert expected is None or got == expected
    assert r.headers["x-request-id"]


def test_openai_client(registered: ServerProcess, t5_backbone: Backbone) -> None:
    client = OpenAI(base_url=f"{registered.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    out = client.completions.create(
        model="summarize", prompt="hello there", max_tokens=7, temperature=0
    )
    sp = shared_prompt(t5_backbone)
    u, v = factors(t5_backbone, seed=TASKS.index("summarize"))
    expected = reference_text(t5_backbone, sp.prompt, u, v, "hello there", 7)
    assert expected is not None and out.choices[0].text == expected
    assert out.choices[0].finish_reason in {"stop", "length"}
    assert out.usage is not None and out.usage.completion_tokens <= 7
    models = [m.id for m in client.models.list()]
    assert models[:2] == [t5_backbone.served_name, "base"]  # the base model, then the tasks
    assert sorted(models[2:]) == sorted(TASKS)
    plain = client.completions.create(model="base", prompt="hello there", max_tokens=7)
    assert plain.model == "base" and plain.choices[0].finish_reason in {"stop", "length"}
    pieces = list(
        client.completions.create(
            model="summarize", prompt="hello there", max_tokens=7, temperature=0, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in pieces) == out.choices[0].text
    assert pieces[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_native_stream(registered: ServerProcess) -> None:
    with httpx.stream(
        "POST",
        f"{registered.url}/v1/tasks/qa/generate",
        headers=CLIENT,
        json={"inputs": "hi", "stream": True, "parameters": {"max_new_tokens": 4}},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event:")]
    assert events[-1] == "done"
    done = json.loads([line for line in lines if line.startswith("data:")][-1][5:])
    assert done["completion_tokens"] <= 4 and done["finish_reason"] in {"length", "stop"}


def _wait_for(check, timeout: float = 1.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "not seen by the other replica in time"
        time.sleep(0.02)
    return time.monotonic() - started


def test_two_replicas_share_writes(
    replicas: list[ServerProcess], registered: ServerProcess, t5_backbone: Backbone
) -> None:
    a, b = replicas
    gen = {"inputs": "hello there", "parameters": {"max_new_tokens": 6}}
    sp = shared_prompt(t5_backbone)
    # B serves (and caches) v1 first, so the replace must invalidate B's device cache.
    r = httpx.post(f"{b.url}/v1/tasks/translate/generate", json=gen, headers=CLIENT, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == 1
    put = task_body(t5_backbone, "translate", seed=42)
    del put["name"]
    r = httpx.put(f"{a.url}/v1/tasks/translate", json=put, headers=ADMIN)
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    u, v = factors(t5_backbone, seed=42)
    expected = reference_text(t5_backbone, sp.prompt, u, v, "hello there", 6)
    assert expected is not None

    def b_serves_v2() -> bool:
        resp = httpx.post(
            f"{b.url}/v1/tasks/translate/generate", json=gen, headers=CLIENT, timeout=60
        )
        return resp.json().get("version") == 2 and resp.json()["texts"] == [expected]

    _wait_for(b_serves_v2)
    new = task_body(t5_backbone, "fresh", seed=7)
    assert httpx.post(f"{a.url}/v1/tasks", json=new, headers=ADMIN).status_code == 201
    _wait_for(
        lambda: (
            httpx.post(
                f"{b.url}/v1/tasks/fresh/generate", json=gen, headers=CLIENT, timeout=60
            ).status_code
            == 200
        )
    )
    assert httpx.delete(f"{b.url}/v1/tasks/fresh", headers=ADMIN).status_code == 204
    for server in (a, b):
        _wait_for(
            lambda s=server: (
                httpx.post(f"{s.url}/v1/tasks/fresh/generate", json=gen, headers=CLIENT).status_code
                == 404
            )
        )
        assert httpx.get(f"{server.url}/v1/tasks/fresh", headers=ADMIN).status_code == 404


def test_ops_routes(registered: ServerProcess) -> None:
    url = registered.url
    gen = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    assert httpx.post(f"{url}/v1/tasks/qa/generate", json=gen, headers=CLIENT).status_code == 200
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/readyz").status_code == 200
    info = httpx.get(f"{url}/v1/info", headers=CLIENT).json()
    assert info["store"] == "redis" and info["backbone"]["kind"] == "seq2seq"
    assert info["backbone"]["d"] == 64 and info["limits"]["max_new_tokens"] == 256
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "rankone_http_requests_total",
        "rankone_batch_size_bucket",
        "rankone_generated_tokens_total",
        "rankone_queue_depth",
        "rankone_device_cache_hits",
        "rankone_store_errors_total",
    ):
        assert name in text, name
    assert 'route="/v1/tasks/{task}/generate"' in text


def test_admin_key_needed_on_every_replica(replicas: list[ServerProcess]) -> None:
    for server in replicas:
        assert httpx.get(f"{server.url}/v1/tasks").status_code == 401
        assert (
            httpx.get(
                f"{server.url}/v1/tasks", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            ).status_code
            == 200
        )


def test_redis_down_is_503_and_not_ready(
    replicas: list[ServerProcess], registered: ServerProcess, redis_server, t5_backbone: Backbone
) -> None:
    """Last in the module: stops the shared redis-server, then starts it again."""
    url = registered.url
    redis_server.stop()
    try:
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 503
        r = httpx.post(
            f"{url}/v1/tasks",
            json=task_body(t5_backbone, "offline", seed=1),
            headers=ADMIN,
            timeout=30,
        )
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "store_unavailable"
        assert "rankone_store_errors_total 0.0" not in httpx.get(f"{url}/metrics").text
    finally:
        redis_server.start()
    # Back up: the first write succeeds although every pooled write connection is stale (a
    # write is never retried, so the PING before it is what reconnects).
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "not ready again after Redis came back"
        time.sleep(0.2)
    r = httpx.post(
        f"{url}/v1/tasks", json=task_body(t5_backbone, "back", seed=2), headers=ADMIN, timeout=30
    )
    assert r.status_code == 201, r.text
