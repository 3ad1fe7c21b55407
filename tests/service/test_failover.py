"""A store that survives its host: a server on a Redis primary with two replicas under three
Sentinels (real processes), the primary SIGKILLed under load.

What must hold: no write the server acknowledged is lost (a write is acknowledged only once a
replica has it: WAIT), warm tasks keep being served (0 5xx), writes come back once a replica
is promoted, and the server's caches are dropped when it reconnects (messages may have been
missed). The time from the kill to the first successful write is printed and recorded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from prompts import Backbone
from service.store.redis_connect import parse_sentinel_url, redact
from service.store.redis_store import RedisBackend
from tests.redis_sentinel import SentinelSet
from tests.service.conftest import (
    ADMIN,
    ServerProcess,
    server_env,
    shared_body,
    shared_prompt,
    task_body,
)

WARM = [f"warm-{i}" for i in range(3)]


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    group = SentinelSet(tmp_path / "redis").start()
    try:
        yield group
    finally:
        group.stop()


def test_sentinel_urls() -> None:
    parsed = parse_sentinel_url("redis+sentinel://:pw@a:26379,b:1/rankone/3")
    assert parsed.sentinels == [("a", 26379), ("b", 1)]
    assert (parsed.service, parsed.db, parsed.password) == ("rankone", 3, "pw")
    assert (
        redact("redis+sentinel://:pw@a:26379,b:1/rankone")
        == "redis+sentinel://:***@a:26379,b:1/rankone"
    )
    for bad in ("redis+sentinel://a:1", "redis+sentinel://a/x", "redis+sentinel://a:1/x/y/z"):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)


@pytest.mark.anyio
async def test_a_write_no_replica_confirms_is_not_acknowledged(redis_url: str) -> None:
    from service.store.base import StoreError

    backend = RedisBackend(redis_url, wait_replicas=1, wait_timeout_ms=20)  # no replica here
    with pytest.raises(StoreError, match=r"0 of the 1 replica.*not acknowledged"):
        await backend.put_shared("p", b"blob", {})
    [outcome] = await backend.put_tasks([("t", b"blob", "p", {})])
    assert isinstance(outcome, StoreError) and "not acknowledged" in str(outcome)
    await backend.close()
    # a WAIT longer than the socket timeout is waited out, not cut short by a read timeout
    slow = RedisBackend(redis_url, wait_replicas=1, wait_timeout_ms=1500, socket_timeout_s=1.0)
    with pytest.raises(StoreError, match="not acknowledged"):
        await slow.put_shared("q", b"blob", {})
    await slow.close()


@pytest.mark.anyio
async def test_job_writes_wait_for_a_replica(redis_url: str, tmp_path: Path) -> None:
    """Fine-tuning files, jobs and events are acknowledged as tasks are: once a replica has
    them (WAIT on the connection that wrote), else a StoreError saying so."""
    from service.jobs.redis_backend import RedisJobBackend
    from service.store.base import StoreError
    from tests.redis_server import RedisServer

    meta = {"id": "file-a", "created_at": 1}
    alone = RedisJobBackend(redis_url, wait_replicas=1, wait_timeout_ms=20)  # no replica here
    with pytest.raises(StoreError, match=r"storing a file.*0 of the 1 replica.*not acknowledged"):
        await alone.put_file(meta, b"{}")
    await alone.close()

    replica = RedisServer(
        tmp_path / "replica",
        extra_args=["--replicaof", *redis_url.split("//")[1].split("/")[0].split(":")],
    ).start()
    try:
        mirrored = redis.Redis.from_url(replica.url)
        deadline = time.monotonic() + 30  # the replica's first full sync
        while mirrored.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica did not sync"
            time.sleep(0.05)
        backend = RedisJobBackend(redis_url, wait_replicas=1, wait_timeout_ms=5000)
        await backend.put_file({**meta, "id": "file-b"}, b"{}")  # waits until the replica has it
        assert mirrored.hget("rankone:ft:file:file-b", "content") == b"{}"
        await backend.add_events("ftjob-x", [{"message": "hi"}])
        assert mirrored.llen("rankone:ft:events:ftjob-x") == 1
        await backend.close()
    finally:
        replica.stop()


def test_primary_killed_under_load(
    sentinels: SentinelSet,
    tiny_t5_dir: Path,
    t5_backbone: Backbone,
    tmp_path: Path,
    record_property: Any,
) -> None:
    env = server_env(tiny_t5_dir, redis_url=sentinels.url, max_wait_ms=1)
    server = ServerProcess(env, tmp_path / "server.log").start()
    try:
        result = asyncio.run(_drive(server, sentinels, t5_backbone))
    finally:
        server.stop()
    print(
        f"\nfailover: first successful write {result['first_write_s']:.2f} s after the kill; "
        f"{result['acked']} writes acknowledged, {result['refused']} refused (503) meanwhile; "
        f"{result['generations']} warm generations ({result['served_between']} in flight between "
        f"the kill and that write), statuses {result['statuses']}"
    )
    record_property("first_write_after_kill_s", round(result["first_write_s"], 3))
    assert result["lost"] == [], "acknowledged writes lost in the failover"
    assert set(result["statuses"]) == {200}, "warm tasks must be served through the failover"
    assert result["served_between"] > 0, "no warm request was in flight between kill and failover"
    assert result["first_write_s"] < 30
    assert result["reset_after_failover"], "the server did not drop its caches on reconnect"


async def _drive(server: ServerProcess, sentinels: SentinelSet, bb: Backbone) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url, headers=ADMIN, timeout=30) as http:
        r = await http.post("/v1/shared-prompts", json=shared_body(shared_prompt(bb)))
        assert r.status_code == 201, r.text
        for i, name in enumerate(WARM):
            assert (
                await http.post("/v1/tasks", json=task_body(bb, name, seed=i))
            ).status_code == 201
        gen = {"inputs": "abc", "parameters": {"max_new_tokens": 2}}
        for name in WARM:  # now in the device cache (and the prompt-prefix cache)
            assert (await http.post(f"/v1/tasks/{name}/generate", json=gen)).status_code == 200
        resets_before = await _resets(http)

        statuses: list[int] = []
        served_at: list[tuple[float, float]] = []  # (sent, answered) of each warm request
        acked: list[str] = []
        refused = 0
        killed_at: float | None = None
        first_write_at: float | None = None
        stop = asyncio.Event()

        async def serve(name: str) -> None:
            while not stop.is_set():
                sent = time.monotonic()
                r = await http.post(f"/v1/tasks/{name}/generate", json=gen)
                statuses.append(r.status_code)
                served_at.append((sent, time.monotonic()))

        async def write() -> None:
            nonlocal refused, first_write_at
            i = 0
            while not stop.is_set():
                name = f"w-{i}"
                i += 1
                sent = time.monotonic()
                r = await http.post("/v1/tasks", json=task_body(bb, name, seed=100 + i))
                if r.status_code == 201:
                    acked.append(name)
                    # the first write sent after the kill (one in flight then may still land)
                    if killed_at is not None and sent > killed_at and first_write_at is None:
                        first_write_at = time.monotonic()
                else:
                    assert r.status_code == 503, r.text  # the store between primaries
                    refused += 1
                    await asyncio.sleep(0.05)

        load = [asyncio.create_task(serve(n)) for n in WARM] + [asyncio.create_task(write())]
        await asyncio.sleep(1.0)
        acked_before_kill = len(acked)
        old = sentinels.kill_primary()
        killed_at = time.monotonic()
        deadline = killed_at + 45
        while time.monotonic() < deadline and (
            first_write_at is None or time.monotonic() < first_write_at + 1.0
        ):
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*load)
        assert acked_before_kill > 0 and first_write_at is not None, (
            f"no write succeeded within 45 s of the kill:\n{server.logs()}"
        )
        reset_after = await _resets(http) > resets_before

    new_port = sentinels.primary_port()
    assert new_port != old.port
    with redis.Redis(port=new_port) as primary:
        lost = [n for n in acked if not primary.exists(f"rankone:task:{n}")]
    return {
        "lost": lost,
        "acked": len(acked),
        "refused": refused,
        "statuses": sorted(set(statuses)),
        "generations": len(statuses),
        # warm requests in flight while there was no primary to write to (all answered 200)
        "served_between": sum(s < first_write_at and a > killed_at for s, a in served_at),
        "first_write_s": first_write_at - killed_at,
        "reset_after_failover": reset_after,
    }


async def _resets(http: httpx.AsyncClient) -> float:
    """The server's count of store resets (cache drops on (re)subscription), from /metrics."""
    text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("rankone_store_resets_total"):
            return float(line.split()[-1])
    raise AssertionError("rankone_store_resets_total is not in /metrics")
