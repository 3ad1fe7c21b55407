"""FactorStore over both backends (a real redis-server and a real directory), then each
backend's own failure modes: Redis going away, two replicas, failed and interrupted writes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from prompts.artifacts import (
    SharedPrompt,
    TaskFactors,
    load_artifact_dir,
    save_shared,
    save_task,
)
from prompts.errors import ArtifactError, BackboneMismatchError
from service.store.base import (
    ConflictError,
    FactorBackend,
    NotFoundError,
    StoreError,
    StoreEvent,
    UnknownSharedError,
    VersionChangedError,
)
from service.store.embedded import EmbeddedBackend
from service.store.factor_store import FactorStore
from service.store.redis_store import RedisBackend

pytestmark = pytest.mark.anyio
FP = "fp-test"
L, D = 4, 8


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


BackendFactory = Callable[[], FactorBackend]


@pytest.fixture(params=["embedded", "redis"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    """A factory of backends that all see the same registry (one dir, or one Redis db)."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return lambda: RedisBackend(url)
    return lambda: EmbeddedBackend(tmp_path / "store")


def make_store(backend: FactorBackend, **kw: Any) -> FactorStore:
    options: dict[str, Any] = {
        "backbone_fingerprint": FP,
        "dim": D,
        "device": "cpu",
        "dtype": torch.float32,
        "cache_bytes": 1 << 20,
        "max_rank": 4,
    }
    options.update(kw)
    return FactorStore(backend, **options)


@pytest.fixture
async def store(make_backend: BackendFactory) -> AsyncIterator[FactorStore]:
    fs = make_store(make_backend())
    await fs.start()
    try:
        yield fs
    finally:
        await fs.close()


def shared(sid: str = "p", length: int = L, dim: int = D, backbone: str = FP) -> SharedPrompt:
    return SharedPrompt(sid, torch.randn(length, dim), backbone)


def task(
    name: str,
    fill: float = 1.0,
    *,
    sid: str = "p",
    length: int = L,
    dim: int = D,
    rank: int = 1,
    backbone: str = FP,
) -> TaskFactors:
    """u [L, r] and v [r, d] both filled with ``fill``, so a read can tell their version."""
    return TaskFactors(
        name, sid, torch.full((length, rank), fill), torch.full((rank, dim), fill), backbone
    )


async def eventually(check: Callable[[], Any], timeout: float = 1.0) -> Any:
    """Await ``check()`` (sync or async) until it returns truthy or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.01)


# ---- both backends ---------------------------------------------------------------------


async def test_create_get_replace_delete(store: FactorStore) -> None:
    await store.register_shared(shared(), {"about": "P"})
    created = await store.create_task(task("t1", 1.0), {"description": "first"})
    assert (created.version, created.shared, created.meta) == (1, "p", {"description": "first"})

    record, tf = await store.get_task("t1")
    assert record.version == 1 and torch.equal(tf.u, torch.ones(L, 1))
    assert (await store.resolve("t1")).version == 1

    replaced = await store.replace_task(task("t1", 2.0), {"description": "second"})
    assert replaced.version == 2 and replaced.created == created.created
    resolved = await store.resolve("t1")  # this replica's own write is visible at once
    assert resolved.version == 2 and torch.equal(resolved.v, torch.full((1, D), 2.0))
    assert (await store.get_task("t1"))[0].meta == {"description": "second"}

    await store.delete_task("t1")
    with pytest.raises(NotFoundError):
        await store.get_task("t1")
    with pytest.raises(NotFoundError):
        await store.resolve("t1")
    with pytest.raises(NotFoundError):
        await store.delete_task("t1")
    assert (await store.list_tasks()).total == 0

    # created again, the name continues its versions: (name, version) stays unique
    again = await store.create_task(task("t1", 3.0), {})
    assert again.version == 3 and (await store.resolve("t1")).version == 3
    assert (await store.replace_task(task("t1", 4.0), {})).version == 4


async def test_duplicate_create_conflicts_and_keeps_the_original(store: FactorStore) -> None:
    await store.register_shared(shared(), {})
    await store.create_task(task("t1", 1.0), {})
    with pytest.raises(ConflictError):
        await store.create_task(task("t1", 5.0), {})
    record, tf = await store.get_task("t1")
    assert record.version == 1 and torch.equal(tf.u, torch.ones(L, 1))
    with pytest.raises(ConflictError):
        await store.register_shared(shared(), {})


async def test_replace_of_absent_task_is_not_found(store: FactorStore) -> None:
    await store.register_shared(shared(), {})
    with pytest.raises(NotFoundError):
        await store.replace_task(task("ghost"), {})
    assert (await store.list_tasks()).total == 0


async def test_a_replace_expecting_an_old_version_writes_nothing(store: FactorStore) -> None:
    await store.register_shared(shared(), {})
    await store.create_task(task("t1", 1.0), {"description": "one"})
    assert (await store.replace_task(task("t1", 2.0), {}, expected_version=1)).version == 2
    with pytest.raises(VersionChangedError):
        await store.replace_task(task("t1", 3.0), {"description": "stale"}, expected_version=1)
    record, tf = await store.get_task("t1")
    assert record.version == 2 and record.meta == {} and torch.equal(tf.u, torch.full((L, 1), 2.0))


async def test_racing_replaces_keep_every_version_in_the_history(store: FactorStore) -> None:
    """Each replace derives the new record's history from the one it read; eight racing
    replaces must each land once, and the last record's history name every earlier version."""
    from service.handlers.registry import RegistryHandler
    from service.protocol.generate import TaskReplace
    from service.settings import Settings

    await store.register_shared(shared(), {})
    await store.create_task(task("t1", 1.0), {"description": "v1"})
    backbone = types.SimpleNamespace(fingerprint=FP)  # all the handler reads of it here
    handler = RegistryHandler(store, backbone, Settings.model_construct())

    def body(i: int) -> TaskReplace:
        return TaskReplace(shared="p", u=[[float(i)]] * L, v=[[float(i)] * D], description=f"r{i}")

    written = await asyncio.gather(*(handler.replace_task("t1", body(i)) for i in range(8)))
    assert sorted(w.version for w in written) == list(range(2, 10))
    versions = (await handler.task_versions("t1")).versions
    assert [v.version for v in versions] == list(range(9, 0, -1))
    # each history entry describes the version it names (its description was written with it)
    by_version = {w.version: w.description for w in written} | {1: "v1"}
    assert all(v.description == by_version[v.version] for v in versions)


async def test_list_paging(store: FactorStore) -> None:
    await store.register_shared(shared(), {})
    names = ["t5", "a1", "t10", "b2", "t2", "c3", "t1"]
    for name in names:
        await store.create_task(task(name), {})
    seen: list[str] = []
    offset: int | None = 0
    pages = 0
    while offset is not None:
        page = await store.list_tasks(offset, 3)
        assert page.total == len(names)
        seen += [r.name for r in page.records]
        offset, pages = page.next_offset, pages + 1
    assert seen == sorted(names) and pages == 3
    assert (await store.list_tasks(7, 3)).records == []
    assert [r.name for r in await store.list_shared()] == ["p"]
    with pytest.raises(ArtifactError):
        await store.create_task(task("t9"), {"bad": object()})
    for offset, limit in [(-1, 10), (0, 0), (0, 1001)]:
        with pytest.raises(ValueError):
            await store.list_tasks(offset, limit)


async def test_name_ranges_list_only_what_the_patterns_match(store: FactorStore) -> None:
    await store.register_shared(shared(), {})
    names = ["team-a", "team-a-1", "team-a-2", "team-a.x", "team-ab", "team-b-1", "x-team-a-3"]
    for name in names:
        await store.create_task(task(name), {})
    backend = store.backend
    assert await backend.task_names("team-a", limit=10) == names[:5]
    assert await backend.task_names("team-a-", limit=10) == ["team-a-1", "team-a-2"]
    assert await backend.task_names("team-a-", after="team-a-1", limit=10) == ["team-a-2"]
    assert await backend.task_names("team-a", after="team-a-2", limit=2) == ["team-a.x", "team-ab"]
    assert await backend.task_names("zz", limit=10) == []
    assert await backend.task_names(limit=3) == names[:3]
    assert [r.name for r in await backend.get_tasks(["team-ab", "gone", "team-a"])] == [
        "team-ab",
        "team-a",
    ]
    page = await store.list_tasks_matching(["team-a-*", "team-b-?"], 0, 2)
    assert [r.name for r in page.records] == ["team-a-1", "team-a-2"]
    assert (page.total, page.next_offset) == (3, 2)
    page = await store.list_tasks_matching(["team-a-*", "team-b-?"], 2, 2)
    assert [r.name for r in page.records] == ["team-b-1"] and page.next_offset is None
    # a pattern with no literal prefix reads every name; a covered prefix is read once
    assert await store.matching_names(["*-a-?", "team-a-[12]"]) == [
        "team-a-1",
        "team-a-2",
        "x-team-a-3",
    ]
    assert [r.name async for r in store.iter_tasks(["team-a*"])] == names[:5]
    assert [r.name async for r in store.iter_tasks()] == names
    await store.delete_task("team-a-1")
    assert await store.matching_names(["team-a-*"]) == ["team-a-2"]


def test_literal_prefixes_and_disjoint_ranges() -> None:
    from service.store.factor_store import literal_prefix, name_ranges

    assert literal_prefix("team-a-*") == "team-a-"
    assert literal_prefix("t?x*") == "t"
    assert literal_prefix("[ab]-*") == ""
    assert literal_prefix("exact") == "exact"
    assert name_ranges(["team-a-*", "team-*", "b", "team-b-?"]) == ["b", "team-"]


async def test_embedded_store_refuses_tasks_past_its_limit(tmp_path: Path) -> None:
    from service.store.base import StoreFullError

    fs = make_store(EmbeddedBackend(tmp_path / "store", max_tasks=2))
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        await fs.create_task(task("t1"), {})
        await fs.create_task(task("t2"), {})
        with pytest.raises(StoreFullError, match=r"at most 2 tasks.*RANKONE_REDIS_URL"):
            await fs.create_task(task("t3"), {})
        await fs.replace_task(task("t2", 2.0), {})  # a replace adds no task
        await fs.delete_task("t1")
        await fs.create_task(task("t3"), {})
    finally:
        await fs.close()
    # the index is read back from the directory at start
    again = make_store(EmbeddedBackend(tmp_path / "store", max_tasks=2))
    await again.start()
    try:
        assert await again.backend.task_names(limit=10) == ["t2", "t3"]
        with pytest.raises(StoreFullError):
            await again.create_task(task("t4"), {})
    finally:
        await again.close()


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (task("t1", backbone="other-model"), BackboneMismatchError),
        (task("t1", sid="nope"), UnknownSharedError),
        (task("t1", length=L + 1), ArtifactError),
        (task("t1", dim=D - 1), ArtifactError),
        (task("t1", rank=5), ArtifactError),  # the store's max_rank is 4
        (
            TaskFactors("t1", "p", torch.full((L, 1), float("nan")), torch.ones(1, D), FP),
            ArtifactError,
        ),
        (task("Bad/Name"), ArtifactError),
    ],
    ids=["backbone", "unknown-shared", "length", "dim", "rank", "nan", "name"],
)
async def test_refused_task_writes_leave_nothing(
    store: FactorStore, bad: TaskFactors, error: type[Exception]
) -> None:
    await store.register_shared(shared(), {})
    with pytest.raises(error):
        await store.create_task(bad, {})
    assert (await store.list_tasks()).total == 0
    with pytest.raises(NotFoundError):
        await store.get_task("t1")


async def test_refused_task_replace_keeps_the_previous_version(store: FactorStore) -> None:
    await store.register_shared(shared(), {})
    await store.create_task(task("t1", 1.0), {})
    with pytest.raises(ArtifactError):
        await store.replace_task(task("t1", 2.0, length=L + 1), {})
    record, tf = await store.get_task("t1")
    assert record.version == 1 and torch.equal(tf.u, torch.ones(L, 1))


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (shared(backbone="other-model"), BackboneMismatchError),
        (shared(dim=D + 1), ArtifactError),
        (shared(length=2000), ArtifactError),  # over max_prompt_length
    ],
    ids=["backbone", "dim", "length"],
)
async def test_refused_shared_prompts(
    store: FactorStore, bad: SharedPrompt, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await store.register_shared(bad, {})
    assert await store.list_shared() == []


async def test_shared_replace_keeps_its_shape(store: FactorStore) -> None:
    await store.register_shared(shared(), {})
    with pytest.raises(ConflictError):
        await store.register_shared(shared(length=L + 1), {}, replace=True)
    record = await store.register_shared(shared(), {"v": 2}, replace=True)
    assert record.version == 2
    assert (await store.get_shared("p"))[0].meta == {"v": 2}


async def test_resolve_caches_tasks_and_holds_one_shared_prompt(
    make_backend: BackendFactory,
) -> None:
    fs = make_store(make_backend(), dtype=torch.float64)
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        for i in range(3):
            await fs.create_task(task(f"t{i}", float(i)), {})
        first = [await fs.resolve(f"t{i}") for i in range(3)]
        assert all(r.prompt is first[0].prompt for r in first)  # P stored once
        assert first[0].u.dtype == torch.float64 and first[2].u[0, 0] == 2.0
        stats = fs.cache_stats()
        assert stats.entries == 4 and stats.bytes == (L * D + 3 * (L + D)) * 8
        hits = stats.hits
        again = await fs.resolve("t1")
        assert again.u is first[1].u and fs.cache_stats().hits == hits + 2
    finally:
        await fs.close()


async def test_tiny_cache_still_resolves(make_backend: BackendFactory) -> None:
    fs = make_store(make_backend(), cache_bytes=16)  # smaller than P: nothing fits
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        await fs.create_task(task("t1", 3.0), {})
        assert (await fs.resolve("t1")).u[0, 0] == 3.0
        assert fs.cache_stats().bytes <= 16
    finally:
        await fs.close()


async def test_a_store_allows_the_rank_it_is_configured_for(make_backend: BackendFactory) -> None:
    """The artifact format's default limit (64) must not override a server's own max_rank."""
    fs = make_store(make_backend(), max_rank=100)
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        await fs.create_task(task("wide", rank=80), {})
        assert (await fs.resolve("wide")).u.shape[1] == 80
        await fs.replace_task(task("wide", 2.0, rank=80), {})
        assert (await fs.get_task("wide"))[0].version == 2
    finally:
        await fs.close()


async def test_concurrent_misses_share_one_backend_read(
    make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend()
    fs = make_store(backend)
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        await fs.create_task(task("t1", 1.0), {})
        reads = 0
        real_get = backend.get_task

        async def counting_get(name: str) -> Any:
            nonlocal reads
            reads += 1
            await asyncio.sleep(0.05)
            return await real_get(name)

        monkeypatch.setattr(backend, "get_task", counting_get)
        resolved = await asyncio.gather(*(fs.resolve("t1") for _ in range(20)))
        assert reads == 1 and all(r.u is resolved[0].u for r in resolved)
    finally:
        await fs.close()


async def test_a_read_that_races_a_replace_is_not_cached(
    make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = make_backend()
    fs = make_store(backend)
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        await fs.create_task(task("t1", 1.0), {})
        gate = asyncio.Event()
        real_get = backend.get_task

        async def slow_get(name: str) -> Any:
            record = await real_get(name)  # reads version 1 ...
            await gate.wait()  # ... and is delivered after the replace below
            return record

        monkeypatch.setattr(backend, "get_task", slow_get)
        racing = asyncio.ensure_future(fs.resolve("t1"))
        await asyncio.sleep(0.05)
        monkeypatch.setattr(backend, "get_task", real_get)
        await fs.replace_task(task("t1", 2.0), {})
        gate.set()
        assert (await racing).version == 1  # it overlapped the write: either answer is fine
        assert (await fs.resolve("t1")).version == 2  # but version 1 was not cached
    finally:
        await fs.close()


async def test_readers_never_mix_versions(make_backend: BackendFactory) -> None:
    writer, reader = make_store(make_backend()), make_store(make_backend())
    await writer.start()
    await reader.start()
    try:
        await writer.register_shared(shared(), {})
        await writer.create_task(task("t1", 1.0), {})

        async def write() -> None:
            for version in range(2, 22):
                await writer.replace_task(task("t1", float(version)), {})

        async def read() -> int:
            reads = 0
            while not writing.done():
                record, tf = await reader.get_task("t1")
                assert tf.u[0, 0] == tf.v[0, 0] == float(record.version)
                reads += 1
            return reads

        writing = asyncio.ensure_future(write())
        reads = await read()
        await writing
        assert reads > 0
        assert (await reader.get_task("t1"))[0].version == 21
    finally:
        await writer.close()
        await reader.close()


async def test_listeners_get_write_events(store: FactorStore) -> None:
    events: list[StoreEvent] = []
    store.add_listener(events.append)
    await store.register_shared(shared(), {})
    await store.create_task(task("t1"), {})
    await store.delete_task("t1")
    expected = [
        StoreEvent("put", "shared", "p", 1),
        StoreEvent("put", "task", "t1", 1),
        StoreEvent("delete", "task", "t1", 1),
    ]
    assert await eventually(lambda: events == expected), events


async def test_seed_from_dir(store: FactorStore, tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    save_shared(seed, shared())
    for name in ("a", "b"):
        save_task(seed, task(name, 1.0))
    assert await store.seed_from_dir(seed) == (1, 2)
    assert await store.seed_from_dir(seed) == (0, 0)  # existing records are left alone
    save_task(seed, task("a", 7.0))
    assert (await store.get_task("a"))[1].u[0, 0] == 1.0
    assert await store.seed_from_dir(seed, overwrite=True) == (1, 2)
    record, tf = await store.get_task("a")
    assert record.version == 2 and tf.u[0, 0] == 7.0


async def test_seed_refuses_another_backbone(store: FactorStore, tmp_path: Path) -> None:
    save_shared(tmp_path / "seed", shared(backbone="other-model"))
    with pytest.raises(BackboneMismatchError):
        await store.seed_from_dir(tmp_path / "seed")
    assert await store.list_shared() == []


# ---- Redis -----------------------------------------------------------------------------


async def test_redis_key_layout(redis_url: str) -> None:
    fs = make_store(RedisBackend(redis_url))
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        await fs.create_task(task("t1"), {"k": 1})
        await fs.create_task(task("t2"), {})
        await fs.delete_task("t2")
    finally:
        await fs.close()
    r = redis.Redis.from_url(redis_url)
    fields = r.hgetall("rankone:task:t1")
    assert set(fields) == {b"blob", b"version", b"shared", b"meta", b"created", b"updated"}
    assert fields[b"version"] == b"1" and fields[b"meta"] == b'{"k": 1}'
    assert r.zrange("rankone:tasks", 0, -1) == [b"t1"]
    assert r.smembers("rankone:shared-ids") == {b"p"}
    assert r.type("rankone:shared:p") == b"hash"
    assert r.hgetall("rankone:deleted-versions") == {b"t2": b"1"}
    assert not r.exists("rankone:task:t2")
    r.close()


async def test_replace_on_one_replica_invalidates_the_other(redis_url: str) -> None:
    a, b = make_store(RedisBackend(redis_url)), make_store(RedisBackend(redis_url))
    await a.start()
    await b.start()
    try:
        await a.register_shared(shared(), {})
        await a.create_task(task("t1", 1.0), {})
        assert (await b.resolve("t1")).version == 1  # now cached on b
        assert (await b.resolve("t1")).version == 1
        await a.replace_task(task("t1", 2.0), {})

        async def b_version() -> int:
            return (await b.resolve("t1")).version

        assert await eventually(lambda: _is(b_version(), 2), timeout=1.0)
        assert (await b.resolve("t1")).u[0, 0] == 2.0

        await a.delete_task("t1")

        async def b_lost_it() -> bool:
            try:
                await b.resolve("t1")
            except NotFoundError:
                return True
            return False

        assert await eventually(b_lost_it, timeout=1.0)
    finally:
        await a.close()
        await b.close()


async def test_malformed_events_do_not_stop_invalidations(redis_url: str) -> None:
    fs = make_store(RedisBackend(redis_url))
    events: list[StoreEvent] = []
    fs.add_listener(events.append)
    await fs.start()
    try:
        admin = redis.Redis.from_url(redis_url)
        for junk in (
            b"not json",
            b'{"action": "put"}',
            b'{"action": "x", "kind": "task", "name": "t", "version": 1}',
        ):
            admin.publish("rankone:events", junk)
        admin.close()
        await fs.register_shared(shared(), {})
        assert await eventually(lambda: StoreEvent("put", "shared", "p", 1) in events)
    finally:
        await fs.close()


async def _is(awaitable: Any, value: Any) -> bool:
    return (await awaitable) == value


async def test_redis_outage_is_a_store_error_then_recovers(
    redis_url: str, redis_server: Any
) -> None:
    errors: list[StoreError] = []
    fs = make_store(RedisBackend(redis_url), on_store_error=errors.append)
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        await fs.create_task(task("t1", 1.0), {})
        await fs.create_task(task("t2", 2.0), {})
        await fs.resolve("t1")
        resets = fs.resets
        redis_server.stop()
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="Redis at"):
                await asyncio.wait_for(fs.resolve("t2"), timeout=15)
            with pytest.raises(StoreError):
                await asyncio.wait_for(fs.create_task(task("t3"), {}), timeout=15)
            assert time.monotonic() - started < 10
            assert not await fs.ping()
            assert fs.store_errors >= 2 and len(errors) == fs.store_errors
        finally:
            redis_server.start()
        # the subscription comes back and drops the whole cache: messages may have been missed
        assert await eventually(lambda: fs.resets > resets, timeout=5.0)
        assert fs.cache_stats().entries == 0
        assert await fs.ping()
        assert (await fs.resolve("t2")).u[0, 0] == 2.0  # AOF kept the data
        await fs.create_task(task("t3"), {})
    finally:
        await fs.close()


async def test_a_redis_that_stops_answering_times_out(redis_url: str, redis_server: Any) -> None:
    fs = make_store(RedisBackend(redis_url, socket_timeout_s=0.5))
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        await fs.create_task(task("t1", 1.0), {})
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="timed out"):
                await asyncio.wait_for(fs.resolve("t1"), timeout=10)
            assert time.monotonic() - started < 3
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        assert (await fs.resolve("t1")).version == 1
    finally:
        await fs.close()


async def test_redis_write_refused_midway_keeps_the_previous_version(redis_url: str) -> None:
    fs = make_store(RedisBackend(redis_url))
    await fs.start()
    admin = redis.Redis.from_url(redis_url)
    try:
        await fs.register_shared(shared(), {})
        await fs.create_task(task("t1", 1.0), {})
        admin.config_set("maxmemory", "1")  # every write is now refused: out of memory
        try:
            with pytest.raises(StoreError, match="maxmemory"):
                await fs.replace_task(task("t1", 2.0), {})
        finally:
            admin.config_set("maxmemory", "0")
        record, tf = await fs.get_task("t1")
        assert record.version == 1 and tf.u[0, 0] == 1.0
    finally:
        admin.close()
        await fs.close()


async def test_redis_connection_dropped_during_write(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = RedisBackend(redis_url)
    fs = make_store(backend)
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        await fs.create_task(task("t1", 1.0), {})

        async def dropped(*args: Any, **kwargs: Any) -> Any:
            raise redis.exceptions.ConnectionError("Connection reset by peer")

        monkeypatch.setattr(backend, "_put_script", dropped)
        with pytest.raises(StoreError, match="reset by peer"):
            await fs.replace_task(task("t1", 2.0), {})
        monkeypatch.undo()
        assert (await fs.get_task("t1"))[0].version == 1
        assert fs.store_errors == 1
    finally:
        await fs.close()


async def test_a_slow_handshake_does_not_health_check_into_its_own_replies(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new write connection pipelines its handshake (CLIENT SETINFO, SELECT) before reading
    the replies; a health-check PING sent in between would read a handshake reply as its own
    (on Redis < 7.2 the SETINFO error, failing the write). A slow machine makes the write
    pool's 1 ms check interval elapse mid-handshake: every write must still succeed."""
    backend = RedisBackend(redis_url)
    conn_class = backend._write_pool.connection_class
    send = conn_class.send_command

    async def slow_send(self: Any, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.005)  # > the 1 ms health-check interval
        await send(self, *args, **kwargs)

    monkeypatch.setattr(conn_class, "send_command", slow_send)
    fs = make_store(backend)
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        for i in range(3):
            await backend._write_pool.disconnect()  # each write on a fresh handshake
            await fs.create_task(task(f"t{i}", 1.0), {})
        assert fs.store_errors == 0
    finally:
        await fs.close()


# ---- embedded --------------------------------------------------------------------------


async def test_embedded_restart_loses_nothing(tmp_path: Path) -> None:
    first = make_store(EmbeddedBackend(tmp_path))
    await first.start()
    await first.register_shared(shared(), {"about": "P"})
    await first.create_task(task("t1", 1.0), {"d": 1})
    await first.replace_task(task("t1", 2.0), {"d": 2})
    await first.close()

    second = make_store(EmbeddedBackend(tmp_path))
    await second.start()
    try:
        record, tf = await second.get_task("t1")
        assert (record.version, record.meta, tf.u[0, 0].item()) == (2, {"d": 2}, 2.0)
        assert (await second.get_shared("p"))[0].meta == {"about": "P"}
    finally:
        await second.close()
    found = load_artifact_dir(tmp_path, backbone=FP)  # still a plain artifact directory
    assert set(found.tasks) == {"t1"} and set(found.shared) == {"p"}


def _fail_replace_when(monkeypatch: pytest.MonkeyPatch, when: Callable[[str], bool]) -> None:
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if when(str(src)):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


async def test_embedded_failed_write_keeps_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = make_store(EmbeddedBackend(tmp_path))
    await fs.start()
    try:
        await fs.register_shared(shared(), {})
        await fs.create_task(task("t1", 1.0), {})
        _fail_replace_when(monkeypatch, lambda src: ".record.json." in src)  # the commit
        with pytest.raises(StoreError, match="previous version is kept"):
            await fs.replace_task(task("t1", 2.0), {})
        monkeypatch.undo()
        record, tf = await fs.get_task("t1")
        assert record.version == 1 and tf.u[0, 0] == 1.0
        leftovers = [p.name for p in (tmp_path / "tasks").iterdir()]
        assert sorted(leftovers) == ["t1.record.json", "t1.safetensors"]
    finally:
        await fs.close()


async def test_embedded_write_interrupted_after_commit_rolls_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = make_store(EmbeddedBackend(tmp_path))
    await fs.start()
    await fs.register_shared(shared(), {})
    await fs.create_task(task("t1", 1.0), {})
    _fail_replace_when(monkeypatch, lambda src: src.endswith(".pending"))  # the last rename
    assert (await fs.replace_task(task("t1", 2.0), {})).version == 2
    record, tf = await fs.get_task("t1")  # read from the pending blob the record names
    assert record.version == 2 and tf.u[0, 0] == 2.0
    monkeypatch.undo()
    await fs.close()

    again = make_store(EmbeddedBackend(tmp_path))
    await again.start()  # rolls the write forward
    try:
        assert not list((tmp_path / "tasks").glob("*.pending"))
        record, tf = await again.get_task("t1")
        assert record.version == 2 and tf.u[0, 0] == 2.0
    finally:
        await again.close()


async def test_embedded_discards_uncommitted_and_orphaned_files(tmp_path: Path) -> None:
    fs = make_store(EmbeddedBackend(tmp_path))
    await fs.start()
    await fs.register_shared(shared(), {})
    await fs.create_task(task("t1", 1.0), {})
    await fs.close()
    tasks = tmp_path / "tasks"
    (tasks / "t1.safetensors.pending").write_bytes(b"half a write")  # crashed before commit
    (tasks / "orphan.safetensors").write_bytes((tasks / "t1.safetensors").read_bytes())

    again = make_store(EmbeddedBackend(tmp_path))
    await again.start()
    try:
        assert not (tasks / "t1.safetensors.pending").exists()
        assert (await again.get_task("t1"))[0].version == 1
        assert [r.name for r in (await again.list_tasks()).records] == ["t1"]
        with pytest.raises(NotFoundError):
            await again.get_task("orphan")
    finally:
        await again.close()


async def test_names_that_could_escape_are_refused(store: FactorStore) -> None:
    for bad in ("../shared/p", "a/b", "", "X"):
        with pytest.raises(ArtifactError):
            await store.get_task(bad)
        with pytest.raises(ArtifactError):
            await store.resolve(bad)
        with pytest.raises(ArtifactError):
            await store.delete_task(bad)
