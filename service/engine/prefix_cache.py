"""Decoder-only prompt KV prefixes: each task prompt's keys/values, computed once per version.

A task's ``L`` soft-prompt rows always sit at positions ``0 .. L-1`` in front of the input, and
a decoder-only model attends causally, so their keys and values do not depend on the input:
the engine computes them once per (task name, version), keeps them in a bytes-bounded LRU on
the model's device, and prefills only the input tokens after them (positions ``L ..``).

Seq2seq backbones cannot use this: their encoder is bidirectional, so the prompt rows' encoder
states depend on the input and must be recomputed for every request.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from torch import Tensor

from service.engine.kv_layout import KV
from service.store.device_cache import DeviceCache

PrefixKey = tuple[str, int]  # (task name, version)


@dataclass(frozen=True)
class PromptPrefix:
    """One task prompt's cache: per layer keys/values [1, H, L, Dh], and the logits after it."""

    layers: tuple[KV, ...]
    last_logits: Tensor  # [V] next-token logits after the prompt (used for an empty input)

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[2]) if self.layers else 0

    @property
    def nbytes(self) -> int:
        kv = sum(
            k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers
        )
        return kv + self.last_logits.numel() * self.last_logits.element_size()


class PrefixCache:
    """Thread-safe LRU of ``PromptPrefix`` by (task, version), bounded in bytes.

    ``invalidate`` is called from the app (store events) while the model thread reads, hence
    the lock.
    """

    def __init__(self, budget_bytes: int) -> None:
        self._cache: DeviceCache[PrefixKey, PromptPrefix] = DeviceCache(budget_bytes)
        self._lock = threading.Lock()

    def get(self, name: str, version: int) -> PromptPrefix | None:
        with self._lock:
            return self._cache.get((name, version))

    def put(self, name: str, version: int, prefix: PromptPrefix) -> None:
        with self._lock:
            # Older versions of the task can never be asked for again.
            self._cache.drop(lambda key, _: key[0] == name and key[1] != version)
            self._cache.put((name, version), prefix, prefix.nbytes)

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

    def __len__(self) -> int:
        return len(self._cache)
