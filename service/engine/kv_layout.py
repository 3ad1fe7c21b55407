"""Pure bookkeeping for batches: padding, merging, trimming, positions, admission.

Per-layer keys/values are ``[B, H, T, Dh]`` with an attention mask ``[B, T]`` (1 = a real
position). Rows have different lengths, so shorter rows are *left*-padded with masked zero
columns: the newest position of every row then sits in the last column. Relative-position
models (T5) see the same key-minus-query distances after a left shift, and absolute-position
models get explicit per-row ``position_ids``, so padding never changes what a row computes.
A group's prefill is built with these helpers; the running batch's self-attention cache lives
in ``kv_cache.SlotKV`` (same left-aligned layout, preallocated), its seq2seq cross-attention
cache is merged with ``merge_layers``.

Everything here is a small function of tensors and ints, tested with plain parametrized cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from prompts.inputs import position_ids_from_mask

KV = tuple[Tensor, Tensor]  # one layer's (keys, values), each [B, H, T, Dh]


def left_pad(x: Tensor, length: int, dim: int) -> Tensor:
    """Zero-pad ``x`` on the left of ``dim`` up to ``length`` (no copy when already long enough)."""
    missing = length - x.shape[dim]
    if missing < 0:
        raise ValueError(f"cannot left-pad dim {dim} of size {x.shape[dim]} down to {length}")
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def pad_sequences(
    rows: Sequence[Tensor], *, side: str, length: int | None = None
) -> tuple[Tensor, Tensor]:
    """Stack variable-length rows ``[n_i, ...]`` into ``[B, N, ...]`` with a mask ``[B, N]``.

    ``side`` is ``"left"`` (decoder-only: real tokens end in the last column) or ``"right"``
    (encoder inputs). Pads are zeros and masked. ``rows`` must not be empty.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not rows:
        raise ValueError("pad_sequences needs at least one row")
    longest = max(r.shape[0] for r in rows)
    width = longest if length is None else length
    if width < longest:
        raise ValueError(f"length {width} is shorter than the longest row ({longest})")
    first = rows[0]
    out = first.new_zeros((len(rows), width, *first.shape[1:]))  # [B, N, ...]
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=first.device)  # [B, N]
    for b, row in enumerate(rows):
        n = row.shape[0]
        if n == 0:
            continue
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        out[b, sl] = row
        mask[b, sl] = 1
    return out, mask


def merge_layers(a: Sequence[KV], b: Sequence[KV]) -> list[KV]:
    """Concatenate two batches' per-layer caches along the batch, left-padding the shorter.

    a: per layer ([Ba, H, Ta, Dh], ...), b: per layer ([Bb, H, Tb, Dh], ...)
    returns per layer ([Ba + Bb, H, max(Ta, Tb), Dh], ...)
    """
    if len(a) != len(b):
        raise ValueError(f"cannot merge caches with {len(a)} and {len(b)} layers")
    merged: list[KV] = []
    for (ka, va), (kb, vb) in zip(a, b, strict=True):
        t = max(ka.shape[2], kb.shape[2])
        merged.append(
            (
                torch.cat([left_pad(ka, t, 2), left_pad(kb, t, 2)], dim=0),
                torch.cat([left_pad(va, t, 2), left_pad(vb, t, 2)], dim=0),
            )
        )
    return merged


def merge_masks(a: Tensor, b: Tensor) -> Tensor:
    """Masks ``[Ba, Ta]`` and ``[Bb, Tb]`` → ``[Ba + Bb, max(Ta, Tb)]``, left-padded with 0."""
    t = max(a.shape[1], b.shape[1])
    return torch.cat([left_pad(a, t, 1), left_pad(b, t, 1)], dim=0)


def leading_pad_columns(mask: Tensor) -> int:
    """How many leading columns of ``mask`` [B, T] are padding in every row (0 for B = 0).

    Once the longest row leaves, those columns are dead weight: slicing them off keeps the
    running cache as short as its longest remaining row.
    """
    if mask.shape[0] == 0 or mask.shape[1] == 0:
        return 0
    pad = ~mask.bool().any(dim=0)  # [T] columns no row uses
    return int(pad.long().cumprod(dim=0).sum())  # length of the all-pad run at the start


def decode_positions(mask: Tensor) -> Tensor:
    """The position id [B] of the next token of each row: its count of real positions."""
    return mask.long().sum(dim=1)


def prefill_positions(prefix_lengths: Tensor, input_mask: Tensor) -> Tensor:
    """Position ids [B, T] for left-padded input tokens that follow each row's prompt prefix.

    prefix_lengths: [B] the prefix length L_b already in the cache
    input_mask:     [B, T] 1 on real input tokens (left-padded)
    Real tokens get L_b, L_b + 1, ...; pads get L_b (they are masked anyway).
    """
    return prefix_lengths.long()[:, None] + position_ids_from_mask(input_mask)


def admission_count(
    costs: Sequence[int],
    *,
    running_rows: int,
    running_tokens: int,
    max_batch_size: int,
    max_batch_tokens: int,
) -> int:
    """How many waiting requests (in FIFO order) join the batch now.

    ``costs`` are the waiting requests' token budgets (prompt + input + max new tokens). The
    queue is never skipped past its head, so no request starves behind smaller ones; a head
    that alone exceeds ``max_batch_tokens`` still runs, by itself, once the batch is empty.
    """
    n = 0
    rows, tokens = running_rows, running_tokens
    for cost in costs:
        if rows >= max_batch_size:
            break
        if tokens + cost > max_batch_tokens and rows > 0:
            break
        n += 1
        rows += 1
        tokens += cost
    return n
