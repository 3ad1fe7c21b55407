"""Pure batch bookkeeping: padding, merging, trimming, positions, admission."""

from __future__ import annotations

import pytest
import torch

from service.engine.kv_layout import (
    admission_count,
    decode_positions,
    leading_pad_columns,
    left_pad,
    merge_layers,
    merge_masks,
    pad_sequences,
    prefill_positions,
)


@pytest.mark.parametrize(("size", "length"), [(0, 0), (0, 3), (2, 2), (2, 5)])
def test_left_pad(size: int, length: int) -> None:
    x = torch.arange(1, size + 1).reshape(1, size)
    out = left_pad(x, length, 1)
    assert out.shape == (1, length)
    assert out[0, length - size :].tolist() == list(range(1, size + 1))
    assert out[0, : length - size].eq(0).all()


def test_left_pad_refuses_shrinking() -> None:
    with pytest.raises(ValueError, match="left-pad"):
        left_pad(torch.ones(1, 3), 2, 1)


@pytest.mark.parametrize(
    ("lengths", "side", "expected_mask"),
    [
        ([1], "left", [[1]]),
        ([0, 2], "left", [[0, 0], [1, 1]]),
        ([1, 3], "left", [[0, 0, 1], [1, 1, 1]]),
        ([1, 3], "right", [[1, 0, 0], [1, 1, 1]]),
        ([0, 0], "right", [[], []]),
    ],
)
def test_pad_sequences(lengths: list[int], side: str, expected_mask: list[list[int]]) -> None:
    rows = [torch.arange(1, n + 1, dtype=torch.float)[:, None].expand(n, 2) for n in lengths]
    out, mask = pad_sequences(rows, side=side)
    assert mask.tolist() == expected_mask
    for b, n in enumerate(lengths):
        real = out[b][mask[b].bool()]
        assert real[:, 0].tolist() == list(range(1, n + 1))
    assert out[~mask.bool()].eq(0).all()


def test_pad_sequences_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        pad_sequences([], side="left")
    with pytest.raises(ValueError, match="side"):
        pad_sequences([torch.ones(1)], side="middle")
    with pytest.raises(ValueError, match="shorter"):
        pad_sequences([torch.ones(3)], side="left", length=2)


def _layer(batch: int, length: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.full((batch, 2, length, 3), fill)  # [B, H, T, Dh]
    return k, k + 100


@pytest.mark.parametrize(
    ("ba", "ta", "bb", "tb"), [(0, 0, 2, 3), (2, 3, 0, 0), (1, 2, 2, 5), (3, 4, 1, 1)]
)
def test_merge_layers_and_masks(ba: int, ta: int, bb: int, tb: int) -> None:
    merged = merge_layers([_layer(ba, ta, 1.0)], [_layer(bb, tb, 2.0)])
    width = max(ta, tb)
    k, v = merged[0]
    assert k.shape == (ba + bb, 2, width, 3)
    assert v.shape == k.shape
    mask = merge_masks(torch.ones(ba, ta, dtype=torch.long), torch.ones(bb, tb, dtype=torch.long))
    assert mask.shape == (ba + bb, width)
    assert mask[:ba].sum() == ba * ta and mask[ba:].sum() == bb * tb
    # Real columns sit at the right edge; padding is zero.
    assert k[:ba, :, width - ta :].eq(1).all() and k[ba:, :, width - tb :].eq(2).all()
    assert k[~mask.bool()[:, None, :, None].expand_as(k)].eq(0).all()


def test_merge_layers_refuses_layer_mismatch() -> None:
    with pytest.raises(ValueError, match="layers"):
        merge_layers([_layer(1, 1, 1.0)], [])


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (torch.zeros(0, 4), 0),
        (torch.zeros(2, 0), 0),
        (torch.tensor([[0, 0, 1], [0, 1, 1]]), 1),
        (torch.tensor([[1, 1], [0, 1]]), 0),
        (torch.tensor([[0, 0], [0, 0]]), 2),
        (torch.tensor([[0, 1, 0, 1]]), 1),
    ],
)
def test_leading_pad_columns(mask: torch.Tensor, expected: int) -> None:
    assert leading_pad_columns(mask) == expected


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (torch.zeros(0, 3), []),
        (torch.tensor([[0, 1, 1], [1, 1, 1]]), [2, 3]),
        (torch.zeros(1, 2), [0]),
    ],
)
def test_decode_positions(mask: torch.Tensor, expected: list[int]) -> None:
    assert decode_positions(mask).tolist() == expected


@pytest.mark.parametrize(
    ("lengths", "mask", "expected"),
    [
        ([], torch.zeros(0, 2), []),
        ([5], [[1, 1, 1]], [[5, 6, 7]]),
        ([3, 100], [[0, 1, 1], [1, 1, 1]], [[3, 3, 4], [100, 101, 102]]),
        ([4], [[0, 0]], [[4, 4]]),
    ],
)
def test_prefill_positions(lengths: list[int], mask, expected: list[list[int]]) -> None:
    mask = torch.as_tensor(mask, dtype=torch.long)
    positions = prefill_positions(torch.tensor(lengths, dtype=torch.long), mask)
    assert positions.tolist() == expected


@pytest.mark.parametrize(
    ("costs", "rows", "tokens", "size", "budget", "expected"),
    [
        ([], 0, 0, 4, 100, 0),  # nothing waiting
        ([10, 10, 10], 0, 0, 2, 100, 2),  # batch size cap
        ([10, 10, 10], 1, 75, 8, 100, 2),  # token budget cap
        ([500, 1], 0, 0, 8, 100, 1),  # an oversized head runs alone on an empty batch...
        ([500, 1], 1, 10, 8, 100, 0),  # ...and waits for an empty one; no skipping past it
        ([10], 4, 0, 4, 100, 0),  # batch full
    ],
)
def test_admission_count(
    costs: list[int], rows: int, tokens: int, size: int, budget: int, expected: int
) -> None:
    assert (
        admission_count(
            costs,
            running_rows=rows,
            running_tokens=tokens,
            max_batch_size=size,
            max_batch_tokens=budget,
        )
        == expected
    )
