"""An LRU cache bounded in bytes: the first tier of the factor store.

Pure bookkeeping: it knows nothing of tensors or devices, the caller says how many bytes a
value holds. A value larger than the whole budget is never cached (the caller keeps using it
uncached), so one huge prompt cannot flush every other entry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class DeviceCache(Generic[K, V]):
    """Least-recently-used cache whose entries' ``nbytes`` sum to at most ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()  # oldest first
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def bytes(self) -> int:
        """Bytes held now (the sum of the cached entries' ``nbytes``)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Membership without touching recency or the hit/miss counters."""
        return key in self._entries

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def get_quiet(self, key: K) -> V | None:
        """The value without touching recency or the hit/miss counters (for bookkeeping)."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key: K, value: V, nbytes: int) -> bool:
        """Cache ``value``, evicting least-recently-used entries to make room.

        Returns False (and caches nothing) when ``nbytes`` exceeds the whole budget; any older
        entry under ``key`` is dropped either way, since it is stale.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self.pop(key)
        if nbytes > self.budget_bytes:
            return False
        while self._bytes + nbytes > self.budget_bytes:
            _, (_, old_nbytes) = self._entries.popitem(last=False)
            self._bytes -= old_nbytes
            self.evictions += 1
        self._entries[key] = (value, nbytes)
        self._bytes += nbytes
        return True

    def pop(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._bytes -= entry[1]
        return entry[0]

    def drop(self, predicate: Callable[[K, V], bool]) -> int:
        """Remove every entry for which ``predicate(key, value)`` holds; returns how many."""
        doomed = [k for k, (v, _) in self._entries.items() if predicate(k, v)]
        for key in doomed:
            self.pop(key)
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
