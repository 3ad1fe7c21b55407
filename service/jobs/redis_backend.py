"""The Redis job backend: files and jobs shared by every replica.

Keys (``rankone`` is the prefix)::

    rankone:ft:file:<id>     hash: meta (JSON), content (the uploaded bytes)
    rankone:ft:files         sorted set of file ids by creation time (listing)
    rankone:ft:job:<id>      string: the job document (JSON)
    rankone:ft:jobs          sorted set of job ids by creation time (listing, paging)
    rankone:ft:queue         sorted set of queued job ids by queue time: claims take the oldest
    rankone:ft:leases        sorted set of running job ids by lease deadline: the expired ones
                             are the head of the set (ZRANGEBYSCORE -inf now)
    rankone:ft:events:<id>   list of the job's events (JSON), oldest first
    rankone:ft:names         hash: task name → the job that reserved it (until the job ends)

Why sorted sets and not a Stream with a consumer group: a stream's pending-entry list reclaims
by idle time (XAUTOCLAIM), but renewing a lease there means re-claiming the entry, cancel and
retry limits need the job document anyway, and a reclaimed consumer is not fenced. Here the
job document is the one source of truth; the two sorted sets are its indexes, updated in the
same MULTI/EXEC as the document under WATCH of the document's key, and every change is the
same pure function (``service.jobs.lifecycle``) the embedded backend applies. A lease is a
deadline on Redis's own clock (TIME), so replicas never disagree about expiry, and the lease
token in the document fences a worker whose job was handed out again. Two replicas claiming
at once both WATCH the oldest job; one EXEC wins, the other retries on the next job.

Acknowledged writes survive a failover as the factor store's do: with ``wait_replicas`` (by
default 1 under Sentinel, else 0) every write goes through one dedicated connection and is
followed by ``WAIT n`` on it (WAIT covers every write its connection made, and a WAIT inside
MULTI would not block), so a write is answered only once a replica has it; otherwise it is a
StoreError saying the write reached the primary but is not acknowledged.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from service.jobs.base import Change, JobBackend, check_id, suffix_taken
from service.jobs.lifecycle import TERMINAL, Event, Job, JobStateError
from service.store.base import NotFoundError, StoreError
from service.store.redis_connect import is_sentinel, pool, redact

T = TypeVar("T")
_CLAIM_SCAN = 16  # queued ids looked at per claim (racing replicas may take the first ones)


class RedisJobBackend(JobBackend):
    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "rankone",
        wait_replicas: int | None = None,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.where = redact(url)
        self.p = f"{prefix}:ft"
        self.wait_replicas = (
            (1 if is_sentinel(url) else 0) if wait_replicas is None else wait_replicas
        )
        self.wait_timeout_ms = wait_timeout_ms
        timeouts: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}
        # Any: redis-py's return types are unions over its decode modes; ours returns bytes
        self._redis: Any = Redis(
            connection_pool=pool(url, max_connections=64, timeout=5.0, **timeouts)
        )
        # Writes: one connection, so that the WAIT after a write runs where the write ran; its
        # reads wait out a WAIT's whole timeout before they time out themselves.
        writes = {**timeouts, "socket_timeout": 5.0 + wait_timeout_ms / 1000}
        self._w: Any = (
            Redis(connection_pool=pool(url, max_connections=1, timeout=10.0, **writes))
            if self.wait_replicas
            else self._redis
        )

    async def _acked(self, what: str) -> None:
        """``what`` reached the primary: return once ``wait_replicas`` replicas have it too."""
        if not self.wait_replicas:
            return
        acks = await self._call(
            what, self._w.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        )
        if int(acks) < self.wait_replicas:
            raise StoreError(
                f"Redis at {self.where}: {what}: applied on the primary, but {acks} of the "
                f"{self.wait_replicas} replica(s) it must reach confirmed it within "
                f"{self.wait_timeout_ms} ms, so it is not acknowledged (a failover could lose "
                "it): read it back before retrying"
            )

    async def _call(self, what: str, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except RedisError as e:
            raise StoreError(f"Redis at {self.where}: {what} failed: {e}") from e

    async def start(self) -> None:
        await self._call("connecting", self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()
        if self._w is not self._redis:
            await self._w.aclose()

    async def now(self) -> float:
        seconds, micros = await self._call("TIME", self._redis.time())
        return float(seconds) + float(micros) / 1e6

    # ---- files -------------------------------------------------------------------------

    async def put_file(self, meta: dict[str, Any], content: bytes) -> None:
        pipe = self._w.pipeline(transaction=True)
        pipe.hset(
            f"{self.p}:file:{meta['id']}", mapping={"meta": json.dumps(meta), "content": content}
        )
        pipe.zadd(f"{self.p}:files", {meta["id"]: meta["created_at"]})
        await self._call("storing a file", pipe.execute())
        await self._acked("storing a file")

    async def get_file(self, file_id: str) -> dict[str, Any]:
        raw = await self._call(
            "reading a file", self._redis.hget(f"{self.p}:file:{check_id(file_id, 'file')}", "meta")
        )
        if raw is None:
            raise NotFoundError(f"no file {file_id!r}")
        return json.loads(raw)  # type: ignore[no-any-return]

    async def file_content(self, file_id: str) -> bytes:
        raw = await self._call(
            "reading a file",
            self._redis.hget(f"{self.p}:file:{check_id(file_id, 'file')}", "content"),
        )
        if raw is None:
            raise NotFoundError(f"no file {file_id!r}")
        return bytes(raw)

    async def list_files(self) -> list[dict[str, Any]]:
        ids = await self._call("listing files", self._redis.zrevrange(f"{self.p}:files", 0, -1))
        if not ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for i in ids:
            pipe.hget(f"{self.p}:file:{i.decode()}", "meta")
        metas = await self._call("listing files", pipe.execute())
        return [json.loads(m) for m in metas if m is not None]

    async def delete_file(self, file_id: str) -> None:
        key = f"{self.p}:file:{check_id(file_id, 'file')}"
        pipe = self._w.pipeline(transaction=True)
        pipe.delete(key)
        pipe.zrem(f"{self.p}:files", file_id)
        deleted, _ = await self._call("deleting a file", pipe.execute())
        if not deleted:
            raise NotFoundError(f"no file {file_id!r}")
        await self._acked("deleting a file")

    # ---- jobs --------------------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self.p}:job:{check_id(job_id, 'ftjob')}"

    def _write(self, pipe: Any, job: Job, events: list[Event]) -> None:
        """Queue the document, its index entries and its events on a MULTI pipeline."""
        job_id, status = job["id"], job["status"]
        pipe.set(self._job_key(job_id), json.dumps(job))
        if status == "queued":
            pipe.zadd(f"{self.p}:queue", {job_id: job["rankone"]["queued_at"]})
        else:
            pipe.zrem(f"{self.p}:queue", job_id)
        if status == "running":
            pipe.zadd(f"{self.p}:leases", {job_id: job["rankone"]["lease_expires_at"]})
        else:
            pipe.zrem(f"{self.p}:leases", job_id)
        if status in TERMINAL:  # the job ended: its task name is free again
            pipe.hdel(f"{self.p}:names", job["rankone"]["task"])
        if events:
            pipe.rpush(f"{self.p}:events:{job_id}", *[json.dumps(e) for e in events])

    async def put_job(self, job: Job, events: list[Event]) -> None:
        """The reservation and the job in one MULTI/EXEC, under WATCH of the names hash: two
        creates racing for one name both read it, one EXEC wins, the other reads it again."""
        names, task = f"{self.p}:names", job["rankone"]["task"]

        async def attempt() -> None:
            async with self._w.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(names)
                        holder = await pipe.hget(names, task)
                        if holder is not None:
                            raw = await pipe.get(self._job_key(holder.decode()))
                            other = json.loads(raw) if raw is not None else None
                            if other is not None and other["status"] not in TERMINAL:
                                raise suffix_taken(task, other)
                        pipe.multi()
                        pipe.hset(names, task, job["id"])
                        pipe.zadd(f"{self.p}:jobs", {job["id"]: job["created_at"]})
                        self._write(pipe, job, events)
                        await pipe.execute()
                        return
                    except WatchError:
                        continue

        await self._call("storing a job", attempt())
        await self._acked("storing a job")

    async def get_job(self, job_id: str) -> Job:
        raw = await self._call("reading a job", self._redis.get(self._job_key(job_id)))
        if raw is None:
            raise NotFoundError(f"no fine-tuning job {job_id!r}")
        return json.loads(raw)  # type: ignore[no-any-return]

    async def list_jobs(self, after: str | None, limit: int) -> tuple[list[Job], bool]:
        index = f"{self.p}:jobs"
        start = 0
        if after is not None:
            rank = await self._call("listing jobs", self._redis.zrevrank(index, after))
            if rank is None:
                return [], False
            start = int(rank) + 1
        ids = await self._call("listing jobs", self._redis.zrevrange(index, start, start + limit))
        pipe = self._redis.pipeline(transaction=False)
        for i in ids[:limit]:
            pipe.get(f"{self.p}:job:{i.decode()}")
        docs = await self._call("listing jobs", pipe.execute()) if ids else []
        return [json.loads(d) for d in docs if d is not None], len(ids) > limit

    async def update_job(self, job_id: str, change: Change) -> Job:
        key = self._job_key(job_id)

        async def attempt() -> Job:
            async with self._w.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        if raw is None:
                            raise NotFoundError(f"no fine-tuning job {job_id!r}")
                        seconds, micros = await pipe.time()
                        new, events = change(json.loads(raw), seconds + micros / 1e6)
                        pipe.multi()
                        self._write(pipe, new, events)
                        await pipe.execute()
                        return new
                    except WatchError:
                        continue  # another replica changed it first: read it again

        new = await self._call("updating a job", attempt())
        await self._acked("updating a job")
        return new

    async def claim_next(self, change: Change) -> Job | None:
        for _ in range(3):  # racing replicas may take every id we saw: look again, twice
            ids = await self._call(
                "reading the queue", self._redis.zrange(f"{self.p}:queue", 0, _CLAIM_SCAN - 1)
            )
            if not ids:
                return None
            for raw_id in ids:
                try:
                    return await self.update_job(raw_id.decode(), change)
                except (JobStateError, NotFoundError):
                    continue  # taken by another replica meanwhile (or deleted)
        return None

    async def expired_jobs(self) -> list[str]:
        now = await self.now()
        ids = await self._call(
            "reading leases", self._redis.zrangebyscore(f"{self.p}:leases", "-inf", now)
        )
        return [i.decode() for i in ids]

    async def add_events(self, job_id: str, events: list[Event]) -> None:
        if events:
            await self._call(
                "adding events",
                self._w.rpush(f"{self.p}:events:{job_id}", *[json.dumps(e) for e in events]),
            )
            await self._acked("adding events")

    async def list_events(self, job_id: str) -> list[Event]:
        await self.get_job(job_id)
        raw = await self._call(
            "reading events", self._redis.lrange(f"{self.p}:events:{job_id}", 0, -1)
        )
        return [json.loads(e) for e in raw]
