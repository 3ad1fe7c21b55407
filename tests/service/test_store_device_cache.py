"""DeviceCache: an LRU bounded in bytes (pure bookkeeping, no tensors)."""

from __future__ import annotations

import pytest

from service.core.device_cache import DeviceCache


@pytest.mark.parametrize(
    ("budget", "puts", "touch", "expected_keys", "evictions"),
    [
        (10, [("a", 4), ("b", 4), ("c", 4)], [], ["b", "c"], 1),  # oldest goes
        (10, [("a", 4), ("b", 4), ("c", 4)], ["a"], ["a", "c"], 1),  # a touched: b goes
        (10, [("a", 4), ("b", 4), ("c", 10)], [], ["c"], 2),  # exact fit flushes all
        (10, [("a", 3), ("b", 3), ("c", 3)], [], ["a", "b", "c"], 0),
        (0, [("a", 0)], [], ["a"], 0),  # a zero-byte value fits a zero budget
        (0, [("a", 1)], [], [], 0),
        (10, [("a", 4), ("a", 6), ("b", 4)], [], ["a", "b"], 0),  # same key replaced, not added
    ],
)
def test_lru_eviction_by_bytes(
    budget: int,
    puts: list[tuple[str, int]],
    touch: list[str],
    expected_keys: list[str],
    evictions: int,
) -> None:
    cache: DeviceCache[str, str] = DeviceCache(budget)
    for i, (key, nbytes) in enumerate(puts):
        if i == len(puts) - 1:
            for t in touch:
                assert cache.get(t) is not None
        cache.put(key, key.upper(), nbytes)
    assert sorted({k for k, _ in puts if k in cache}) == sorted(expected_keys)
    assert cache.evictions == evictions
    assert cache.bytes == sum(dict(puts)[k] for k in set(expected_keys))
    assert cache.bytes <= budget


def test_value_larger_than_budget_is_not_cached_and_drops_the_stale_entry() -> None:
    cache: DeviceCache[str, str] = DeviceCache(10)
    assert cache.put("a", "small", 4)
    assert cache.put("b", "other", 4)
    assert not cache.put("a", "huge", 11)
    assert "a" not in cache and "b" in cache
    assert cache.bytes == 4 and cache.evictions == 0


def test_hit_and_miss_counts() -> None:
    cache: DeviceCache[str, int] = DeviceCache(100)
    assert cache.get("x") is None
    cache.put("x", 1, 8)
    assert cache.get("x") == 1
    assert cache.get("x") == 1
    assert cache.get_quiet("x") == 1  # bookkeeping reads count nothing
    assert "x" in cache
    assert (cache.hits, cache.misses) == (2, 1)


def test_pop_drop_clear() -> None:
    cache: DeviceCache[tuple[str, str], int] = DeviceCache(100)
    for i, key in enumerate([("task", "a"), ("task", "b"), ("shared", "p")]):
        cache.put(key, i, 10)
    assert cache.pop(("task", "a")) == 0
    assert cache.pop(("task", "a")) is None
    assert cache.drop(lambda k, _v: k[0] == "task") == 1
    assert len(cache) == 1 and cache.bytes == 10
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


@pytest.mark.parametrize(("budget", "nbytes"), [(-1, 0), (10, -1)])
def test_negative_sizes_are_refused(budget: int, nbytes: int) -> None:
    with pytest.raises(ValueError):
        cache: DeviceCache[str, str] = DeviceCache(budget)
        cache.put("a", "x", nbytes)
