"""The prompt-prefix cache under a long tail: once full, a task's prefix is admitted on its
second miss, so tasks asked for once do not evict the ones asked for again and again."""

from __future__ import annotations

import torch

from service.engine.prefix_cache import PrefixCache, PromptPrefix


def prefix() -> PromptPrefix:
    kv = (torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8))  # 256 bytes
    return PromptPrefix(layers=(kv,), last_logits=torch.zeros(16))  # + 64 = 320 bytes


def test_one_off_tasks_do_not_evict_the_hot_ones() -> None:
    cache = PrefixCache(3 * 320, seen_names=100)  # room for three prefixes
    for hot in ("h1", "h2", "h3"):
        cache.put(hot, 1, prefix())  # admitted: there is room
    for i in range(50):  # a long tail of tasks asked for once each
        cache.put(f"tail-{i}", 1, prefix())
    assert all(cache.get(h, 1) is not None for h in ("h1", "h2", "h3"))
    assert cache.refused == 50 and len(cache) == 3
    # a task that comes back is admitted on its second miss (evicting the least recent)
    cache.put("tail-7", 1, prefix())
    assert cache.get("tail-7", 1) is not None and cache.get("h1", 1) is None
    # a new version of a cached task replaces it at once
    cache.put("tail-7", 2, prefix())
    assert cache.get("tail-7", 2) is not None and cache.get("tail-7", 1) is None


def test_the_doorkeeper_forgets_old_names() -> None:
    cache = PrefixCache(320, seen_names=2)
    cache.put("a", 1, prefix())
    cache.put("b", 1, prefix())  # full: refused, remembered
    cache.put("c", 1, prefix())
    cache.put("d", 1, prefix())  # "b" falls out of the two remembered names
    cache.put("b", 1, prefix())
    assert cache.get("b", 1) is None and cache.get("a", 1) is not None
    cache.put("d", 1, prefix())
    assert cache.get("d", 1) is not None


def test_a_cached_prefix_owns_its_storage() -> None:
    """A prefix put as views into a whole batch's keys/values is copied when admitted (the
    batch is not kept alive by the cache); one that owns its storage is kept as it is."""
    batch = torch.arange(4 * 2 * 6 * 8, dtype=torch.float32).reshape(4, 2, 6, 8)
    view = PromptPrefix(((batch[1:2, :, 2:5], batch[1:2, :, 2:5]),), batch[1, 0, 0])
    own = prefix()
    cache = PrefixCache(1 << 20)
    cache.put("views", 1, view)
    cache.put("own", 1, own)
    got = cache.get("views", 1)
    assert got is not None and got.nbytes == view.nbytes
    k, v = got.layers[0]
    assert v.untyped_storage().nbytes() == v.nbytes
    assert torch.equal(k, batch[1:2, :, 2:5]) and k.untyped_storage().nbytes() == k.nbytes
    assert got.last_logits is not None and got.last_logits.untyped_storage().nbytes() == 32
    kept = cache.get("own", 1)
    assert kept is not None and kept.layers[0][0] is own.layers[0][0]


def test_an_input_entry_rides_on_its_prompt_entry() -> None:
    """A task's latest-input entry is kept only beside its prompt entry, and never spends the
    doorkeeper's memory of the prompt's refusal: a one-off task's input does not evict a hot
    task, and a task that comes back still gets its prompt admitted on its second miss."""
    cache = PrefixCache(3 * 320, seen_names=100)
    cache.put("hot", 1, prefix())
    cache.put_input("hot", 1, prefix())  # beside its prompt: kept
    cache.put("warm", 1, prefix())
    assert cache.get_input("hot", 1) is not None
    cache.put("tail", 1, prefix())  # full: refused (first miss), remembered
    cache.put_input("tail", 1, prefix())  # no prompt entry: not kept, evicts nothing
    assert cache.get_input("tail", 1) is None and len(cache) == 3
    assert cache.get("hot", 1) is not None and cache.get("warm", 1) is not None
    cache.put("tail", 1, prefix())  # its second miss: admitted
    assert cache.get("tail", 1) is not None
    cache.put_input("tail", 1, prefix())  # now beside its prompt: kept (evicting the LRU)
    assert cache.get_input("tail", 1) is not None
