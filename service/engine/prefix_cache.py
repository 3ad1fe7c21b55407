"""Decoder-only prompt KV prefixes: each task prompt's keys/values, computed once per version.

A task's ``L`` soft-prompt rows always sit at positions ``0 .. L-1`` in front of the input, and
a decoder-only model attends causally, so their keys and values do not depend on the input:
the engine computes them once per (task name, version), keeps them in a bytes-bounded LRU on
the model's device, and prefills only the input tokens after them (positions ``L ..``).

The same holds for the input's first tokens: the keys/values of prompt + ``x[:j]`` depend on
those tokens only. So the cache also keeps, per task, the input columns of its latest request
(``put_input``: the input's alone, after the prompt's, which the task's prompt entry holds, so
a task costs its L columns once), and a new request whose input starts with the same ``j``
tokens (a chat template's system turn, a shared instruction) reuses the prompt's columns and
the input's first ``j`` and prefills only the rest: one entry per task, reused up to the
longest common prefix.

Admission under a long tail: a prefix is megabytes (L rows × layers × keys and values), so the
cache holds tens of tasks, while requests may draw from a million. Once the cache is full, a
task's prefix is admitted only on its second miss among the last ``seen_names`` tasks that
missed (a doorkeeper, as in TinyLFU): a task asked for once does not evict the prefixes of
the tasks asked for again and again, and a task that comes back is cached from its second
request on. While there is room, every prefix is admitted. A task's latest-input entry is
admitted only beside its prompt entry (its columns follow the prompt's, useless alone) and
never through the doorkeeper: the prompt's refusal is what the doorkeeper remembers.

Seq2seq backbones cannot use this: their encoder is bidirectional, so the prompt rows' encoder
states depend on the input and must be recomputed for every request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from torch import Tensor

from service.core.device_cache import DeviceCache
from service.engine.kv_layout import KV

PrefixKey = tuple[str, int, str]  # (task name, version, "prompt" | "input")


@dataclass(frozen=True)
class PromptPrefix:
    """One task prompt's cache: per layer keys/values [1, H, L, Dh] and the logits after them
    (the prompt entry); or an input's columns [1, H, len(tokens), Dh] that follow the prompt's
    (the input entry: ``tokens`` are that input's, ``last_logits`` empty)."""

    layers: tuple[KV, ...]
    # [V] next-token logits after the prompt (used for an empty input); None where the prompt
    # was prefilled together with an input (a request with an empty input computes them then)
    last_logits: Tensor | None
    tokens: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[2]) if self.layers else 0

    def compact(self) -> PromptPrefix:
        """The prefix with each tensor in storage of its own size: a view into a whole batch's
        keys/values (or logits) is copied, so that caching it does not keep the batch alive."""
        return PromptPrefix(
            tuple((_own(k), _own(v)) for k, v in self.layers),
            None if self.last_logits is None else _own(self.last_logits),
            self.tokens,
        )

    @property
    def nbytes(self) -> int:
        kv = sum(
            k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers
        )
        logits = self.last_logits
        return kv + (0 if logits is None else logits.numel() * logits.element_size())


class PrefixCache:
    """Thread-safe LRU of ``PromptPrefix`` by (task, version), bounded in bytes.

    ``invalidate`` is called from the app (store events) while the model thread reads, hence
    the lock.
    """

    def __init__(self, budget_bytes: int, *, seen_names: int = 4096) -> None:
        self._cache: DeviceCache[PrefixKey, PromptPrefix] = DeviceCache(budget_bytes)
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()  # tasks refused once, oldest first
        self._seen_names = seen_names
        self.refused = 0  # prefixes not admitted (first miss of a task while full)
        # lookups per kind, for /metrics: a prompt hit saves the L prompt rows' prefill; an
        # input hit (the task's latest input, then cut to the common prefix) saves more
        self.lookups = {
            (kind, result): 0 for kind in ("prompt", "input") for result in ("hit", "miss")
        }

    def get(self, name: str, version: int) -> PromptPrefix | None:
        """The task prompt's prefix."""
        return self._lookup((name, version, "prompt"))

    def holds(self, name: str, version: int) -> bool:
        """Whether the task prompt's prefix is cached (no lookup counted, recency untouched)."""
        with self._lock:
            return self._cache.get_quiet((name, version, "prompt")) is not None

    def _lookup(self, key: PrefixKey) -> PromptPrefix | None:
        with self._lock:
            found = self._cache.get(key)
            self.lookups[key[2], "miss" if found is None else "hit"] += 1
            return found

    def put(self, name: str, version: int, prefix: PromptPrefix) -> None:
        self._put((name, version, "prompt"), prefix)

    def get_input(self, name: str, version: int) -> PromptPrefix | None:
        """The columns of the task's latest request's input (``prefix.tokens``), which follow
        its prompt's."""
        return self._lookup((name, version, "input"))

    def put_input(self, name: str, version: int, prefix: PromptPrefix) -> None:
        self._put((name, version, "input"), prefix)

    def _put(self, key: PrefixKey, prefix: PromptPrefix) -> None:
        """Cache ``prefix`` (views are fine: it is copied into its own storage only once
        admitted, so a refused prefix costs no copy)."""
        name, version, _ = key
        with self._lock:
            # Older versions of the task can never be asked for again.
            self._cache.drop(lambda k, _: k[0] == name and k[1] != version)
            if key[2] == "input":
                if (name, version, "prompt") not in self._cache:
                    return  # an input's columns are of no use without its prompt's
            elif not self._admit(key, prefix.nbytes):
                self.refused += 1
                return
            self._cache.put(key, prefix.compact(), prefix.nbytes)

    def _admit(self, key: PrefixKey, nbytes: int) -> bool:
        """Room for it, a replacement of the same key, or the task's second miss while full."""
        name = key[0]
        if self._cache.bytes + nbytes <= self._cache.budget_bytes or key in self._cache:
            return True
        if name in self._seen:
            del self._seen[name]
            return True
        self._seen[name] = None
        if len(self._seen) > self._seen_names:
            self._seen.popitem(last=False)
        return False

    def invalidate(self, name: str | None = None) -> int:
        """Forget one task's prefixes (any version), or all of them when ``name`` is None."""
        with self._lock:
            if name is None:
                n = len(self._cache)
                self._cache.clear()
                return n
            return self._cache.drop(lambda key, _: key[0] == name)

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    @property
    def bytes(self) -> int:
        return self._cache.bytes

    def stats(self) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        """For /metrics: lookups since start by (kind, hit | miss), and refused / entries /
        bytes."""
        with self._lock:
            sizes = {
                "refused": self.refused,
                "entries": len(self._cache),
                "bytes": self._cache.bytes,
            }
            return dict(self.lookups), sizes

    def __len__(self) -> int:
        return len(self._cache)


def _own(t: Tensor) -> Tensor:
    """``t``, or a copy of it where its storage holds more than ``t`` (a view)."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
