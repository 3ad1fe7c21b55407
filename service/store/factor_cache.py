"""FactorCache: the device tier of the factor store.

Decoded tensors on the model's device in a byte-bounded LRU (``DeviceCache``), keyed by
``("task", name)`` → ``u``/``v`` with their version and ``("shared", id)`` → the shared prompt.
Two things make it safe to put in front of a store that other replicas write to:

- concurrent misses of one key share one backend read (a burst of requests for a cold task
  costs one round trip), and a caller that is cancelled does not cancel the others;
- a read that an invalidation overtakes returns its result but does not cache it (the read
  may predate the write the invalidation is about), so a stale version never sticks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from service.core.device_cache import DeviceCache

CacheKey = tuple[str, str]  # ("task", name) | ("shared", id)


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    bytes: int
    entries: int
    budget_bytes: int


@dataclass(frozen=True)
class SharedEntry:
    version: int
    prompt: Tensor  # [L, d] on the model's device/dtype


@dataclass(frozen=True)
class TaskEntry:
    version: int
    shared_id: str
    u: Tensor  # [L, r] on the model's device/dtype
    v: Tensor  # [r, d]
    parameters: dict[str, Any] = field(default_factory=dict)  # default generation parameters


Entry = SharedEntry | TaskEntry
Loader = Callable[[], Awaitable[tuple[Entry, int]]]  # → (entry, its size in bytes)


def nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Flight:
    """One backend read of a missed key, shared by every caller that missed it meanwhile."""

    def __init__(self) -> None:
        self.task: asyncio.Future[Entry]
        self.stale = False  # invalidated while in flight: return the result, do not cache it


def _retrieve(task: asyncio.Future[Entry]) -> None:
    # every caller may have been cancelled: mark the exception as seen so asyncio does not log it
    if not task.cancelled():
        task.exception()


class FactorCache:
    def __init__(self, budget_bytes: int) -> None:
        self._lru: DeviceCache[CacheKey, Entry] = DeviceCache(budget_bytes)
        self._in_flight: dict[CacheKey, _Flight] = {}

    def stats(self) -> CacheStats:
        c = self._lru
        return CacheStats(c.hits, c.misses, c.evictions, c.bytes, len(c), c.budget_bytes)

    async def get_or_load(self, key: CacheKey, load: Loader) -> Entry:
        """The cached entry under ``key``, else the result of ``load()``, which is cached."""
        entry = self._lru.get(key)
        if entry is not None:
            return entry
        flight = self._in_flight.get(key)
        if flight is None:
            flight = _Flight()
            flight.task = asyncio.ensure_future(self._fill(key, load, flight))
            flight.task.add_done_callback(_retrieve)
            self._in_flight[key] = flight
        return await asyncio.shield(flight.task)

    async def _fill(self, key: CacheKey, load: Loader, flight: _Flight) -> Entry:
        try:
            entry, size = await load()
        finally:
            if self._in_flight.get(key) is flight:
                del self._in_flight[key]
        current = self._lru.get_quiet(key)
        # not cached if invalidated meanwhile, or if a newer version got into the cache first
        if not flight.stale and (current is None or current.version < entry.version):
            self._lru.put(key, entry, size)
        return entry

    def invalidate(self, kind: str, name: str, *, keep_newer_than: int | None = None) -> None:
        """Drop ``(kind, name)`` (kind 'all': everything) and make reads in flight uncacheable.

        With ``keep_newer_than``, an entry whose version is at least that is kept: the event
        is about a version this cache already holds.
        """
        if kind == "all":
            self.clear()
            return
        key = (kind, name)
        if key in self._in_flight:  # later misses start a fresh read
            self._in_flight.pop(key).stale = True
        cached = self._lru.get_quiet(key)
        if cached is not None and (keep_newer_than is None or cached.version < keep_newer_than):
            self._lru.pop(key)

    def clear(self) -> None:
        for flight in self._in_flight.values():
            flight.stale = True
        self._in_flight.clear()
        self._lru.clear()
