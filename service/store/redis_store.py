"""The Redis backend: the registry of record shared by every replica.

Keys (``rankone`` is the prefix)::

    rankone:shared:<id>    hash: blob, version, shared, meta (JSON), created, updated
    rankone:task:<name>    hash: the same fields
    rankone:shared-ids     set of shared-prompt ids
    rankone:tasks          sorted set, every score 0, so members sort by name (paged listing)
    rankone:deleted-versions  hash: last version of each deleted task, so that a name
                           created again continues at version + 1 and (name, version) never
                           names two different sets of factors
    rankone:events         pub/sub channel: {"action", "kind", "name", "version"} per write

Every write is one Lua script (``redis_scripts.py``) rather than WATCH + MULTI/EXEC. Redis
runs a script as one atomic step, so the existence check (create-if-absent / replace-if-present
/ the task's shared prompt exists), the blob, the version bump, the index update and the
PUBLISH happen together or not at all, in one round trip, with no optimistic-retry loop and no
dedicated WATCH connection. The scripts carry a ``#!lua`` shebang: Redis then refuses a writing script up
front when it is out of memory, instead of failing it half-way. Key types are checked before
the first write, so no later command in a script can fail. A reader reads a record with one
HGETALL, hence never sees a half write.

A listener task keeps a subscription to the channel on its own connection (no silent
reconnects: it must know when it reconnected) and hands every event, this replica's own
included, to ``on_event``; after every (re)subscription it first sends a 'reset' event, since
messages may have been missed while it was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from prompts.artifacts import utc_now
from service.store.base import (
    ConflictError,
    EventHandler,
    FactorBackend,
    NotFoundError,
    Page,
    Record,
    StoreError,
    StoreEvent,
    UnknownSharedError,
    VersionChangedError,
    deliver,
)
from service.store.redis_connect import is_sentinel, pool, redact
from service.store.redis_scripts import DELETE_SCRIPT, PUT_SCRIPT

__all__ = ["RedisBackend", "redact"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_Mode = Literal["create", "replace", "upsert"]


class RedisBackend(FactorBackend):
    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "rankone",
        pool_size: int = 32,
        pool_timeout_s: float = 5.0,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        resubscribe_max_delay_s: float = 1.0,
        wait_replicas: int | None = None,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.prefix = prefix
        self.channel = f"{prefix}:events"
        self.tasks_index = f"{prefix}:tasks"
        self.shared_index = f"{prefix}:shared-ids"
        self.deleted = f"{prefix}:deleted-versions"
        self.resubscribe_max_delay_s = resubscribe_max_delay_s
        # A write is acknowledged only once this many replicas have it (WAIT): then a failover
        # to one of them keeps it. None: 1 under Sentinel (whose point is failover), else 0.
        self.wait_replicas = (
            (1 if is_sentinel(url) else 0) if wait_replicas is None else wait_replicas
        )
        self.wait_timeout_ms = wait_timeout_ms
        timeouts: dict[str, Any] = {
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
            # a peer that vanished without closing (host down, network cut) is noticed in
            # ~10 s instead of the kernel's default two hours
            "socket_keepalive": True,
            "socket_keepalive_options": _keepalive_options(),
        }
        # Reads retry twice on a dropped connection, then fail with a StoreError; a Redis that
        # does not answer fails after one socket timeout (no retry: that would triple it).
        # Under Sentinel a retried connection asks the Sentinels for the primary again.
        self._pool = pool(
            url,
            max_connections=pool_size,
            timeout=pool_timeout_s,
            retry=Retry(
                ExponentialBackoff(cap=0.5, base=0.05), 2, supported_errors=(RedisConnectionError,)
            ),
            health_check_interval=30,
            **timeouts,
        )
        self._client = Redis(connection_pool=self._pool)
        # Writes never retry: a write whose reply was lost may have been applied, and running
        # it again would turn a successful create into a 409 or a delete into a 404.
        # What a write does instead is PING first (on a connection idle for over a
        # millisecond: in practice every write, which are rare admin calls) and reconnect once
        # if that PING fails, since a PING is safe to repeat: after a Redis restart, however
        # soon, a write then reconnects instead of failing on a pooled stale socket.
        self._write_pool = pool(
            url,
            max_connections=max(2, pool_size // 4),
            timeout=pool_timeout_s,
            connection_class=_reconnecting_ping,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0.001,
            # a write's reply may wait out a WAIT's whole timeout before the socket times out
            **{**timeouts, "socket_timeout": socket_timeout_s + wait_timeout_ms / 1000},
        )
        self._writer = Redis(connection_pool=self._write_pool)
        # The subscription never reconnects behind our back: a reconnect must emit 'reset'.
        self._sub_pool = pool(
            url,
            max_connections=2,
            timeout=pool_timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=5,
            **timeouts,
        )
        self._sub_client = Redis(connection_pool=self._sub_pool)
        self._put_script = self._writer.register_script(PUT_SCRIPT)
        self._delete_script = self._writer.register_script(DELETE_SCRIPT)
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._start_timeout_s = connect_timeout_s + socket_timeout_s

    def key(self, kind: Literal["shared", "task"], name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    async def _call(self, what: str, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except RedisTimeoutError as e:
            raise StoreError(
                f"Redis at {self.where}: {what} timed out: {e}; if it was a write, it may or may "
                "not have been applied: read the record back before retrying"
            ) from e
        except (RedisConnectionError, OSError) as e:
            raise StoreError(
                f"Redis at {self.where}: {what} failed: {e}; check that Redis is running and "
                "reachable from this server"
            ) from e
        except RedisError as e:
            raise StoreError(f"Redis at {self.where}: {what} failed: {e}") from e

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, on_event: EventHandler) -> None:
        await self._call("connecting", self._client.ping())
        self._listener = asyncio.create_task(self._listen(on_event), name="rankone-store-events")
        # Writes made right after start() must reach this replica's own subscription too.
        try:
            await asyncio.wait_for(self._subscribed.wait(), self._start_timeout_s)
        except TimeoutError:
            await self.close()
            raise StoreError(
                f"Redis at {self.where}: could not subscribe to {self.channel} within "
                f"{self._start_timeout_s:.0f}s"
            ) from None

    async def _listen(self, on_event: EventHandler) -> None:
        delay = 0.05
        while True:
            pubsub: PubSub = self._sub_client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await deliver(on_event, StoreEvent("reset", "all", "", 0))
                self._subscribed.set()
                delay = 0.05
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        event = _parse_event(message["data"])
                        if event is not None:
                            await deliver(on_event, event)
            except (RedisError, OSError) as e:
                log.warning(
                    "lost the subscription to %s on Redis at %s (%s); retrying in %.2fs",
                    self.channel,
                    self.where,
                    e,
                    delay,
                )
            except Exception:  # a dead listener would leave every cache stale: keep it alive
                log.exception("store event listener failed; resubscribing in %.2fs", delay)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.resubscribe_max_delay_s)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        for client in (self._sub_client, self._client, self._writer):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
        for p in (self._pool, self._write_pool, self._sub_pool):
            with contextlib.suppress(RedisError, OSError):
                await p.disconnect()

    async def ping(self) -> bool:
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    # ---- writes ------------------------------------------------------------------------

    def put_args(
        self,
        kind: Literal["shared", "task"],
        name: str,
        blob: bytes,
        shared: str,
        meta: dict[str, Any],
        mode: _Mode,
        now: str,
        expected_version: int | None = None,
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of PUT_SCRIPT (public so a bulk loader can pipeline the same write)."""
        record_key = self.key(kind, name)
        if kind == "task":
            keys = [record_key, self.tasks_index, self.key("shared", shared), self.deleted]
        else:
            keys = [record_key, self.shared_index, record_key, self.deleted]
        index_type = "zset" if kind == "task" else "set"
        args = [name, blob, shared, json.dumps(meta), now, mode, self.channel, kind, index_type]
        args.append("" if expected_version is None else str(expected_version))
        return keys, args

    async def _put(
        self,
        kind: Literal["shared", "task"],
        name: str,
        blob: bytes,
        shared: str,
        meta: dict[str, Any],
        mode: _Mode,
        expected_version: int | None = None,
    ) -> Record:
        now = utc_now()
        keys, args = self.put_args(kind, name, blob, shared, meta, mode, now, expected_version)
        what = f"writing {kind} {name!r}"
        if not self.wait_replicas:
            reply = await self._call(what, self._put_script(keys=keys, args=args))
        else:
            async with self._writer.pipeline(transaction=False) as pipe:
                await self._put_script(keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
                reply, acks = await self._call(what, pipe.execute())
            if int(reply[0]) > 0:
                self._check_acks(what, int(acks))
        outcome = _put_outcome(kind, name, blob, shared, meta, now, reply)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _check_acks(self, what: str, acks: int) -> None:
        """A write the primary applied but fewer than ``wait_replicas`` replicas confirmed in
        time is not acknowledged: a failover now could lose it."""
        if acks < self.wait_replicas:
            raise StoreError(
                f"Redis at {self.where}: {what}: applied on the primary, but {acks} of the "
                f"{self.wait_replicas} replica(s) it must reach confirmed it within "
                f"{self.wait_timeout_ms} ms, so it is not acknowledged (a failover could lose "
                "it): read the record back before retrying"
            )

    async def put_tasks(
        self, items: list[tuple[str, bytes, str, dict[str, Any]]]
    ) -> list[Record | Exception]:
        """Every item's write script in one pipelined round trip (each script still atomic on
        its own: per item, the same write as ``put_task(create=True)``)."""
        if not items:
            return []
        now = utc_now()
        async with self._writer.pipeline(transaction=False) as pipe:
            for name, blob, shared, meta in items:
                keys, args = self.put_args("task", name, blob, shared, meta, "create", now)
                await self._put_script(keys=keys, args=args, client=pipe)
            if self.wait_replicas:  # one WAIT covers every write before it on the connection
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            replies = await self._call(
                f"writing {len(items)} tasks", pipe.execute(raise_on_error=False)
            )
        unconfirmed: StoreError | None = None
        if self.wait_replicas:
            acks = replies.pop()
            try:
                if isinstance(acks, Exception):
                    raise StoreError(f"Redis at {self.where}: WAIT failed: {acks}")
                self._check_acks(f"writing {len(items)} tasks", int(acks))
            except StoreError as e:
                unconfirmed = e
        results: list[Record | Exception] = []
        for (name, blob, shared, meta), reply in zip(items, replies, strict=True):
            if isinstance(reply, Exception):
                results.append(StoreError(f"Redis at {self.where}: writing task {name!r}: {reply}"))
                continue
            outcome = _put_outcome("task", name, blob, shared, meta, now, reply)
            results.append(unconfirmed if unconfirmed and isinstance(outcome, Record) else outcome)
        return results

    async def put_shared(
        self, name: str, blob: bytes, meta: dict[str, Any], *, replace: bool = False
    ) -> Record:
        return await self._put("shared", name, blob, name, meta, "upsert" if replace else "create")

    async def put_task(
        self,
        name: str,
        blob: bytes,
        shared: str,
        meta: dict[str, Any],
        *,
        create: bool,
        expected_version: int | None = None,
    ) -> Record:
        mode: _Mode = "create" if create else "replace"
        return await self._put("task", name, blob, shared, meta, mode, expected_version)

    async def delete_task(self, name: str) -> None:
        what = f"deleting task {name!r}"
        keys, args = [self.key("task", name), self.tasks_index, self.deleted], [name, self.channel]
        if not self.wait_replicas:
            deleted = await self._call(what, self._delete_script(keys=keys, args=args))
        else:
            async with self._writer.pipeline(transaction=False) as pipe:
                await self._delete_script(keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
                deleted, acks = await self._call(what, pipe.execute())
            if int(deleted):
                self._check_acks(what, int(acks))
        if int(deleted) == 0:
            raise NotFoundError(f"no task named {name!r}")

    # ---- reads -------------------------------------------------------------------------

    async def _get(self, kind: Literal["shared", "task"], name: str) -> Record:
        fields = await self._call(
            f"reading {kind} {name!r}", self._client.hgetall(self.key(kind, name))
        )
        if not fields:
            what = "shared prompt" if kind == "shared" else "task"
            raise NotFoundError(f"no {what} named {name!r}")
        return _record(kind, name, fields)

    async def get_shared(self, name: str) -> Record:
        return await self._get("shared", name)

    async def get_task(self, name: str) -> Record:
        return await self._get("task", name)

    async def _get_many(self, kind: Literal["shared", "task"], names: list[str]) -> list[Record]:
        if not names:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.key(kind, name))
            rows = await self._call(f"reading {len(names)} {kind} records", pipe.execute())
        # a record deleted between the index read and here is skipped
        return [_record(kind, n, f) for n, f in zip(names, rows, strict=True) if f]

    async def list_shared(self) -> list[Record]:
        members = await self._call(
            "listing shared prompts", self._client.smembers(self.shared_index)
        )
        return await self._get_many("shared", sorted(_text(m) for m in members))

    async def task_names(
        self, prefix: str = "", *, after: str | None = None, limit: int
    ) -> list[str]:
        # every score is 0, so ZRANGEBYLEX walks the index in name order from the range's start
        # (O(log N + returned)); names are ASCII, so prefix + 0xff bounds every name under it
        low = b"[" + prefix.encode() if prefix else b"-"
        if after is not None and after >= prefix:
            low = b"(" + after.encode()
        high = b"[" + prefix.encode() + b"\xff" if prefix else b"+"
        members = await self._call(
            f"listing tasks under {prefix!r}",
            self._client.zrangebylex(self.tasks_index, low, high, start=0, num=limit),
        )
        return [_text(m) for m in members]

    async def get_tasks(self, names: list[str]) -> list[Record]:
        return await self._get_many("task", names)

    async def list_tasks(self, *, offset: int = 0, limit: int = 100) -> Page:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zcard(self.tasks_index)
            pipe.zrange(self.tasks_index, offset, offset + limit - 1)
            total, members = await self._call("listing tasks", pipe.execute())
        records = await self._get_many("task", [_text(m) for m in members])
        end = offset + len(members)
        return Page(records=records, total=int(total), next_offset=end if end < total else None)

    # ---- for the benchmark and operators ------------------------------------------------

    @property
    def client(self) -> Redis:
        return self._client

    @property
    def writer(self) -> Redis:
        """The client writes go through (no retries); pipeline the write script on it."""
        return self._writer

    @property
    def put_script(self) -> Any:
        return self._put_script


def _put_outcome(
    kind: Literal["shared", "task"],
    name: str,
    blob: bytes,
    shared: str,
    meta: dict[str, Any],
    now: str,
    reply: Any,
) -> Record | Exception:
    """PUT_SCRIPT's reply as the Record written, or the error that refused the write."""
    result = int(reply[0])
    what = "shared prompt" if kind == "shared" else "task"
    if result == -1:
        return ConflictError(f"{what} {name!r} already exists; use replace to update it")
    if result == -2:
        return NotFoundError(f"no {what} named {name!r} to replace")
    if result == -3:
        return UnknownSharedError(f"no shared prompt named {shared!r}; register it first")
    if result == -4:
        return VersionChangedError(f"{what} {name!r} changed since it was read")
    return Record(kind, name, blob, result, shared, meta, reply[1].decode(), now)


def _keepalive_options() -> dict[int, int]:
    wanted = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3}
    return {getattr(socket, k): v for k, v in wanted.items() if hasattr(socket, k)}


def _parse_event(data: bytes | str) -> StoreEvent | None:
    try:
        raw = json.loads(data)
        event = StoreEvent(raw["action"], raw["kind"], str(raw["name"]), int(raw["version"]))
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring a malformed store event %r: %s", data, e)
        return None
    if event.action not in ("put", "delete", "reset"):
        log.warning("ignoring a store event with unknown action %r", event.action)
        return None
    return event


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _record(kind: Literal["shared", "task"], name: str, fields: dict[Any, Any]) -> Record:
    """A record from HGETALL's reply (bytes keys and values: the client does not decode)."""
    return Record(
        kind=kind,
        name=name,
        blob=fields[b"blob"],
        version=int(fields[b"version"]),
        shared=fields[b"shared"].decode(),
        meta=json.loads(fields.get(b"meta") or b"{}"),
        created=fields.get(b"created", b"").decode(),
        updated=fields.get(b"updated", b"").decode(),
    )


def _reconnecting_ping(base: type[Any]) -> type[Any]:
    """``base`` (the URL's connection class) whose health check reconnects once when its PING
    fails, whatever the command's own retry policy (none, for writes).

    No check runs during the connection's handshake: redis-py pipelines it (CLIENT SETINFO,
    SELECT, then reads the replies), and a PING sent in between would read a handshake reply
    as its own (on Redis < 7.2 SETINFO's error, failing the write)."""

    class ReconnectingPing(base):  # type: ignore[misc, valid-type]
        _handshake = False

        async def on_connect(self) -> None:  # redis-py < 6 connects through this
            self._handshake = True
            try:
                await super().on_connect()
            finally:
                self._handshake = False

        async def on_connect_check_health(self, check_health: bool = True) -> None:
            self._handshake = True
            try:
                await super().on_connect_check_health(check_health=check_health)
            finally:
                self._handshake = False

        async def check_health(self) -> None:
            if not self.health_check_interval or self._handshake:
                return
            if asyncio.get_running_loop().time() <= self.next_health_check:
                return
            try:
                await self._send_ping()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await self.disconnect()
                await self.connect()  # raises if Redis is really down
                await self._send_ping()

    ReconnectingPing.__name__ = f"ReconnectingPing{base.__name__}"
    return ReconnectingPing
