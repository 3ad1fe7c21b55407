"""The slot KV layout: in-place writes, admission into free slots, swap-remove, window moves."""

from __future__ import annotations

import pytest
import torch

from service.engine.kv_cache import SlotCache, SlotKV

H, DH, LAYERS = 2, 3, 2


def rows_kv(
    lengths: list[int], seed: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Left-padded per-layer KV [b, H, T, Dh] (pads zero) and mask [b, T] for rows of ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, t - n :] = 1
    layers = []
    for _ in range(LAYERS):
        k = torch.randn(len(lengths), H, t, DH, generator=g) * mask[:, None, :, None]
        v = torch.randn(len(lengths), H, t, DH, generator=g) * mask[:, None, :, None]
        layers.append((k, v))
    return layers, mask


class Reference:
    """Each row's real keys per layer as a growing list (what the window must show)."""

    def __init__(self) -> None:
        self.rows: list[list[torch.Tensor]] = []  # per row, per layer keys [H, n, Dh]

    def admit(self, layers, mask) -> None:
        for b in range(mask.shape[0]):
            real = mask[b].bool()
            self.rows.append([k[b][:, real] for k, _ in layers])

    def check(self, kv: SlotKV) -> None:
        assert kv.n == len(self.rows)
        window = kv.window_mask()
        # no real column outside the window: a fixed-shape step attends over every column
        # (FusedLlama.step_full), the mask alone hiding what is not a row's own
        assert torch.equal(kv.mask[: kv.n].sum(1), window.sum(1))
        for i in range(LAYERS):
            keys, _ = kv.layer_window(i)
            for b, row in enumerate(self.rows):
                n = row[i].shape[1]
                assert window[b].sum() == n
                assert window[b, kv.width - n :].all()  # left-aligned to the newest column
                torch.testing.assert_close(keys[b][:, kv.width - n :], row[i], rtol=0, atol=0)


def step(kv: SlotKV, ref: Reference, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    kv.open_column()
    for i in range(LAYERS):
        k = torch.randn(kv.n, H, 1, DH, generator=g)
        keys, _ = kv.write(i, k, k.clone())
        assert keys.shape == (kv.n, H, kv.width + 1, DH)
        for b, row in enumerate(ref.rows):
            row[i] = torch.cat([row[i], k[b]], dim=1)
    kv.close_column()


def test_admit_step_retire_match_reference() -> None:
    kv, ref = SlotKV(LAYERS, torch.device("cpu"), torch.float32), Reference()
    for lengths, seed in (([3, 5], 1), ([2], 2), ([7, 1], 3)):
        layers, mask = rows_kv(lengths, seed)
        kv.admit(layers, mask)
        ref.admit(layers, mask)
        ref.check(kv)
        step(kv, ref, seed + 10)
        ref.check(kv)
    order = kv.retire([1, 3, 4])  # slots 0 and 2 free: 3 moves into 0, 4 into 2
    assert order == [3, 1, 4]
    ref.rows = [ref.rows[i] for i in order]
    ref.check(kv)
    for s in range(200):  # enough to move the window a few times
        step(kv, ref, 100 + s)
    ref.check(kv)
    assert kv.retire([]) == [] and kv.n == 0 and kv.width == 0


@pytest.mark.parametrize(
    ("live", "keep", "order"),
    [
        (3, [0, 1, 2], [0, 1, 2]),
        (3, [0, 2], [0, 2]),
        (3, [1, 2], [2, 1]),
        (4, [3], [3]),
        (2, [], []),
    ],
)
def test_retire_swap_remove_order(live: int, keep: list[int], order: list[int]) -> None:
    kv = SlotKV(LAYERS, torch.device("cpu"), torch.float32)
    kv.admit(*rows_kv([2] * live, 0))
    assert kv.retire(keep) == order


def test_admission_writes_only_the_new_slot() -> None:
    kv = SlotKV(LAYERS, torch.device("cpu"), torch.float32, min_rows=8)
    kv.admit(*rows_kv([4, 6], 0))
    for _ in range(3):
        kv.open_column()
        for i in range(LAYERS):
            kv.write(i, torch.ones(kv.n, H, 1, DH), torch.ones(kv.n, H, 1, DH))
        kv.close_column()
    before = [k.clone() for k in kv.keys]
    moves, width = kv.moves, kv.width
    kv.admit(*rows_kv([5], 1))
    assert kv.moves == moves and kv.width == width  # no reallocation, no window change
    for old, new in zip(before, kv.keys, strict=True):
        torch.testing.assert_close(old[:2], new[:2], rtol=0, atol=0)


def test_window_moves_are_amortised() -> None:
    kv = SlotKV(LAYERS, torch.device("cpu"), torch.float32)
    kv.admit(*rows_kv([10, 4], 0))
    for _ in range(1000):
        kv.open_column()
        for i in range(LAYERS):
            kv.write(i, torch.zeros(kv.n, H, 1, DH), torch.zeros(kv.n, H, 1, DH))
        kv.close_column()
    assert kv.width == 1010
    assert kv.moves <= 6  # geometric growth: log2(1010 / 64) + the first allocation


def test_window_shrinks_when_the_longest_row_leaves() -> None:
    kv = SlotKV(LAYERS, torch.device("cpu"), torch.float32)
    kv.admit(*rows_kv([9, 3], 0))
    assert kv.width == 9
    kv.retire([1])
    assert kv.width == 3 and kv.window_mask().all()


def test_failed_slot_is_scrubbed_before_reuse() -> None:
    kv = SlotKV(LAYERS, torch.device("cpu"), torch.float32)
    kv.admit(*rows_kv([4, 4], 0))
    for i in range(LAYERS):
        kv.keys[i][1].fill_(float("nan"))
    kv.retire([0], scrub=[1])
    kv.admit(*rows_kv([2], 1))  # reuses slot 1; its pad columns are in the window
    for i in range(LAYERS):
        assert torch.isfinite(kv.layer_window(i)[0]).all()


def test_slot_cache_speaks_the_cache_api() -> None:
    kv = SlotKV(LAYERS, torch.device("cpu"), torch.float32)
    kv.admit(*rows_kv([3, 5], 0))
    cache = SlotCache(kv)
    assert cache.get_seq_length() == 5
    assert cache.get_mask_sizes(1, 0) == (6, 0)
    kv.open_column()
    keys, _ = cache.update(torch.ones(2, H, 1, DH), torch.ones(2, H, 1, DH), 1)
    assert keys.shape == (2, H, 6, DH) and keys[:, :, -1].eq(1).all()


def test_a_row_with_masked_holes_keeps_its_whole_span() -> None:
    """A cached-prefix row: [prompt; pads; short input] spans more columns than it counts."""
    layers, mask = rows_kv([6, 5], 0)
    mask[0, 1:4] = 0  # row 0: real at columns 0, 4, 5 (3 real positions over 6 columns)
    kv = SlotKV(LAYERS, torch.device("cpu"), torch.float32)
    kv.admit(layers, mask)
    assert kv.width == 6
    kv.retire([0])
    assert kv.width == 6
    assert kv.window_mask()[0].tolist() == [True, False, False, False, True, True]
