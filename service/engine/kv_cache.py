"""The running batch's self-attention KV cache: preallocated slots, in-place writes.

Every layer owns two buffers ``[R, H, C, Dh]`` (R row slots, C time columns). Live rows occupy
slots ``0 .. n-1``; the batch's *window* is the columns ``start .. end``. Every row's newest
position sits in column ``end - 1`` (rows are left-aligned to a shared write column, shorter
rows padded on the left with masked columns), so:

- a decode step writes one column (``end``) of every layer in place and the model attends over
  the window as a view: O(new tokens) work besides attention itself, no copy of the cache;
- admission writes the new rows' prefill into free slots, ending at column ``end``: O(new rows);
- retirement moves the last live row into each freed slot (swap-remove): O(one row);
- the window only moves (a copy of the live cache) when it runs out of columns on either side,
  and then into buffers with twice the room, so the copies are amortised O(1) per step.

Relative-position models (T5) see the same key-minus-query distances in this layout, and
absolute-position models get explicit per-row ``position_ids``, so padding never changes what
a row computes. The layout has fixed addresses between moves, which is also what a CUDA-graph
captured decode step needs (capture per (rows, window bucket), replay with the write column
as a device tensor).

``SlotCache`` exposes it to Hugging Face models through transformers' ``Cache`` API: each
``SlotLayer.update`` writes the step's keys/values at the write column and returns the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from service.engine.kv_layout import KV

_MIN_ROWS = 8
_MIN_COLUMNS = 64


def _grow(need: int, have: int, floor: int) -> int:
    """A capacity >= ``need``: ``have`` doubled until it fits (never below ``floor``)."""
    size = max(have, floor)
    while size < need:
        size *= 2
    return size


class SlotKV:
    """Per-layer slot buffers, the window, and the per-slot attention mask (see module doc)."""

    def __init__(
        self, n_layers: int, device: torch.device, dtype: torch.dtype, *, min_rows: int = 0
    ) -> None:
        self.n_layers = n_layers
        self.min_rows = min_rows  # slots to allocate up front (the engine's max batch size)
        self.device = device
        self.dtype = dtype
        self.keys: list[Tensor] = []  # per layer [R, H, C, Dh]
        self.values: list[Tensor] = []
        # [R, C] True = a live row's own real column, nowhere else (a fixed-shape step that
        # attends over every column relies on it: FusedLlama.step_full)
        self.mask = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.n = 0  # live rows, in slots 0 .. n-1
        self.start = 0  # first column of the window
        self.end = 0  # one past the newest column (the next write column)
        self.first: list[int] = []  # [n] each live row's first real column
        self.shapes: list[tuple[int, int, int, int]] = []  # per layer (H_k, Dh_k, H_v, Dh_v)
        self.moves = 0  # window moves / reallocations (a bench figure)

    # -- shape -----------------------------------------------------------------------------

    @property
    def rows_capacity(self) -> int:
        return int(self.mask.shape[0])

    @property
    def columns(self) -> int:
        return int(self.mask.shape[1])

    @property
    def width(self) -> int:
        """Columns in the window (the cache length every row attends over)."""
        return self.end - self.start

    def window_mask(self, extra: int = 0) -> Tensor:
        """The live rows' mask over the window plus ``extra`` new columns: [n, width + extra]."""
        return self.mask[: self.n, self.start : self.end + extra]

    def layer_window(self, layer: int, extra: int = 0) -> KV:
        """Views [n, H, width + extra, Dh] of one layer's live keys/values (no copy)."""
        sl = slice(self.start, self.end + extra)
        return self.keys[layer][: self.n, :, sl], self.values[layer][: self.n, :, sl]

    # -- admission -------------------------------------------------------------------------

    def admit(self, layers: Sequence[KV], mask: Tensor) -> None:
        """Write new rows (per layer [b, H, T, Dh], left-padded, ``mask`` [b, T]) into slots.

        The rows take slots ``n .. n+b-1`` and end at the shared write column: only their own
        columns are written, whatever the running rows' cache length.
        """
        if len(layers) != self.n_layers:
            raise ValueError(f"expected {self.n_layers} layers, got {len(layers)}")
        b, t = int(mask.shape[0]), int(mask.shape[1])
        if not self.shapes:
            self.shapes = [(k.shape[1], k.shape[3], v.shape[1], v.shape[3]) for k, v in layers]
        if self.n == 0 and self.keys:  # an empty batch restarts at the buffers' left edge
            self.start = self.end = min(t, self.columns - 1)
        self._make_room(rows=self.n + b, left=t, right=1)
        lo, hi = self.n, self.n + b
        cols = slice(self.end - t, self.end)
        for i, (k, v) in enumerate(layers):
            self.keys[i][lo:hi, :, cols] = k
            self.values[i][lo:hi, :, cols] = v
        self.mask[lo:hi] = False
        self.mask[lo:hi, cols] = mask.bool()
        # Each row's first real column; a cached-prefix row has masked columns between its
        # prompt and a shorter input, so this is not end minus its length. One host read per
        # admission, none per step.
        leading = mask.long().argmax(dim=1).tolist()  # [b] first 1 of each row
        self.first += [self.end - t + int(p) for p in leading]
        self.start = min(self.first)
        self.n = hi

    def _make_room(self, *, rows: int, left: int, right: int) -> None:
        """Ensure ``rows`` slots, ``left`` columns before ``end`` and ``right`` after it."""
        if (
            self.keys
            and rows <= self.rows_capacity
            and self.end - left >= 0
            and self.end + right <= self.columns
        ):
            return
        width = self.width if self.n else 0
        # Some room on the left for a longer row to come, and on the right at least the window
        # again: the next move is then >= width steps away (amortised O(1) per step).
        end = max(left, width) + _MIN_COLUMNS
        columns = _grow(end + max(width, right, _MIN_COLUMNS), self.columns, _MIN_COLUMNS)
        rows_cap = _grow(rows, max(self.rows_capacity, self.min_rows), _MIN_ROWS)
        self._reallocate(rows_cap, columns, end)

    def _reallocate(self, rows_cap: int, columns: int, end: int) -> None:
        """New buffers [rows_cap, H, columns, Dh] with the live window copied to end at ``end``.

        Zero-filled: masked columns must hold finite numbers (0 · NaN would poison a row).
        """
        old_keys, old_values, old_mask = self.keys, self.values, self.mask
        width = self.width if self.n else 0
        src = slice(self.start, self.end)
        dst = slice(end - width, end)
        self.keys, self.values = [], []
        for i, (hk, dk, hv, dv) in enumerate(self.shapes):
            k = torch.zeros(rows_cap, hk, columns, dk, dtype=self.dtype, device=self.device)
            v = torch.zeros(rows_cap, hv, columns, dv, dtype=self.dtype, device=self.device)
            if width:
                k[: self.n, :, dst] = old_keys[i][: self.n, :, src]
                v[: self.n, :, dst] = old_values[i][: self.n, :, src]
            self.keys.append(k)
            self.values.append(v)
        self.mask = torch.zeros(rows_cap, columns, dtype=torch.bool, device=self.device)
        if width:
            self.mask[: self.n, dst] = old_mask[: self.n, src]
        shift = end - self.end
        self.first = [f + shift for f in self.first]
        self.start, self.end = end - width, end
        self.moves += 1

    # -- decoding --------------------------------------------------------------------------

    def open_column(self) -> None:
        """Before a decode step: make room for, and unmask, every live row's next column."""
        assert self.keys, "no rows admitted"
        self._make_room(rows=self.n, left=0, right=1)
        self.mask[: self.n, self.end] = True

    def write(self, layer: int, keys: Tensor, values: Tensor) -> KV:
        """Write ``keys``/``values`` [n, H, q, Dh] at the write column; return the window."""
        q = keys.shape[2]
        sl = slice(self.end, self.end + q)
        self.keys[layer][: self.n, :, sl] = keys
        self.values[layer][: self.n, :, sl] = values
        return self.layer_window(layer, q)

    def close_column(self, q: int = 1) -> None:
        """After the forward: the ``q`` written columns become part of the window."""
        self.end += q

    # -- retirement ------------------------------------------------------------------------

    def retire(self, keep: Sequence[int], scrub: Sequence[int] = ()) -> list[int]:
        """Keep live rows ``keep`` (old slot indices); returns the new slot order (old indices).

        Each freed slot below the new row count receives the last live row (swap-remove): one
        row's window is copied per freed slot, nothing else moves. ``scrub`` are slots whose
        contents may be non-finite (a row that failed): they are zeroed before any reuse.
        """
        kept = set(keep)
        n = len(keep)
        for slot in scrub:
            for i in range(self.n_layers):
                self.keys[i][slot].zero_()
                self.values[i][slot].zero_()
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in range(n, self.n) if i in kept]
        order = list(range(n))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        if holes:
            dst = torch.tensor(holes, dtype=torch.long, device=self.device)
            src = torch.tensor(movers, dtype=torch.long, device=self.device)
            sl = slice(self.start, self.end)
            for i in range(self.n_layers):
                self.keys[i][dst, :, sl] = self.keys[i][src, :, sl]
                self.values[i][dst, :, sl] = self.values[i][src, :, sl]
            # the window holds every real column of the freed rows too (``start`` shrinks
            # after this): no stale True is left outside it
            self.mask[dst, sl] = self.mask[src, sl]
        self.first = [self.first[i] for i in order]
        self.n = n
        if n == 0:
            self.start = self.end = 0
        else:
            # The window shrinks to the longest remaining row: a view, no copy.
            self.start = min(self.first)
        return order

    def release(self) -> None:
        """Drop the buffers (the batch is empty and its memory goes back)."""
        self.keys, self.values = [], []
        self.mask = torch.zeros(0, 0, dtype=torch.bool, device=self.device)
        self.n = self.start = self.end = 0
        self.first = []
        self.shapes = []


class SlotLayer(CacheLayerMixin):
    """One layer of ``SlotKV`` behind transformers' cache-layer interface."""

    is_compileable = False
    is_sliding = False

    def __init__(self, store: SlotKV, index: int) -> None:  # no super().__init__: keys are views
        self.store = store
        self.index = index
        self.is_initialized = True

    @property
    def keys(self) -> Tensor:  # type: ignore[override]
        return self.store.layer_window(self.index)[0]

    @property
    def values(self) -> Tensor:  # type: ignore[override]
        return self.store.layer_window(self.index)[1]

    @property
    def device(self) -> torch.device:
        return self.store.device

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        return None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> KV:
        return self.store.write(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.width + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.width

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """A transformers ``Cache`` over a ``SlotKV`` (decode steps of the running batch)."""

    def __init__(self, store: SlotKV) -> None:
        super().__init__(layers=[SlotLayer(store, i) for i in range(store.n_layers)])
        self.store = store
