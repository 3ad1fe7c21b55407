"""The composition math of Multitask Prompt Tuning, in one place for trainer and server.

A task's prompt is the shared prompt scaled element-wise by a rank-r product of its factors:
``P_k = P ⊙ (U_k @ V_k)`` (sum over rank, no scaling). This is exactly what PEFT's
``MultitaskPromptEmbedding`` computes with ``prefix_task_cols = U``, ``prefix_task_rows = V``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def compose_prompt(prompt: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """One task prompt: ``prompt`` [L, d] ⊙ (``u`` [L, r] @ ``v`` [r, d]) → [L, d]."""
    if prompt.dim() != 2 or u.dim() != 2 or v.dim() != 2:
        raise ValueError(
            f"compose_prompt expects prompt [L, d], u [L, r], v [r, d]; got "
            f"{tuple(prompt.shape)}, {tuple(u.shape)}, {tuple(v.shape)}"
        )
    return compose_prompts(
        prompt[None], torch.zeros(1, dtype=torch.long, device=prompt.device), u[None], v[None]
    )[0]


def compose_prompts(shared: Tensor, shared_index: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """A batch of task prompts in one op.

    shared:       [S, L, d]  the distinct shared prompts the batch uses
    shared_index: [B]        row b uses ``shared[shared_index[b]]``
    u:            [B, L, r]  per-row task column factors
    v:            [B, r, d]  per-row task row factors
    returns:      [B, L, d]  ``shared[shared_index] * (u @ v)``, in ``shared``'s dtype
    """
    if shared.dim() != 3 or u.dim() != 3 or v.dim() != 3 or shared_index.dim() != 1:
        raise ValueError(
            "compose_prompts expects shared [S, L, d], shared_index [B], u [B, L, r], v [B, r, d]; "
            f"got {tuple(shared.shape)}, {tuple(shared_index.shape)}, {tuple(u.shape)}, "
            f"{tuple(v.shape)}"
        )
    batch, length, rank = u.shape
    _, seq, dim = shared.shape
    if v.shape[0] != batch or v.shape[1] != rank or shared_index.shape[0] != batch:
        raise ValueError(
            f"batch/rank mismatch: u {tuple(u.shape)}, v {tuple(v.shape)}, "
            f"shared_index {tuple(shared_index.shape)}"
        )
    if length != seq or v.shape[2] != dim:
        raise ValueError(
            f"factors do not fit the shared prompt [L={seq}, d={dim}]: u {tuple(u.shape)}, "
            f"v {tuple(v.shape)}"
        )
    base = shared.index_select(0, shared_index)  # [B, L, d]
    u = u.to(base.dtype)
    v = v.to(base.dtype)
    if rank == 1:
        # Rank one is an outer product: two broadcasts, no matmul kernel.
        return base * (u * v)  # [B, L, 1] * [B, 1, d] → [B, L, d]
    return base * torch.bmm(u, v)


def compose_rows(
    shared: Sequence[Tensor],
    shared_index: Sequence[int],
    u: Sequence[Tensor],
    v: Sequence[Tensor],
) -> list[Tensor]:
    """Each row's task prompt [L_b, d], with one ``compose_prompts`` op per (L, r) group.

    shared:       S tensors [L_s, d]  the shared prompts (each may be used by several rows)
    shared_index: B ints              row b composes over ``shared[shared_index[b]]``
    u, v:         B tensors           row b's factors [L_b, r_b] and [r_b, d]

    Rows of one prompt length and rank (one group in the common case) are composed together
    over the stack of the shared prompts they use. The trainer's prompt bank and the server's
    engines compose batches through this function.
    """
    out: list[Tensor | None] = [None] * len(u)
    groups: dict[tuple[int, int], list[int]] = {}
    for b, (ub, sb) in enumerate(zip(u, shared_index, strict=True)):
        groups.setdefault((int(shared[sb].shape[0]), int(ub.shape[1])), []).append(b)
    for members in groups.values():
        used: dict[int, int] = {}  # shared index -> its place in this group's stack
        for b in members:
            used.setdefault(shared_index[b], len(used))
        device = shared[shared_index[members[0]]].device
        prompts = compose_prompts(
            torch.stack([shared[s] for s in used]),  # [S', L, d]
            torch.tensor([used[shared_index[b]] for b in members], device=device),  # [B']
            torch.stack([u[b] for b in members]),  # [B', L, r]
            torch.stack([v[b] for b in members]),  # [B', r, d]
        )  # [B', L, d]
        for j, b in enumerate(members):
            out[b] = prompts[j]
    return [p for p in out if p is not None]


def identity_factors(
    length: int,
    dim: int,
    rank: int = 1,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Factors whose product is all ones, so the task prompt equals the shared prompt.

    For rank r each of the r outer products contributes 1/r, keeping ``U @ V = 1``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    u = torch.ones(length, rank, dtype=dtype, device=device)  # [L, r]
    v = torch.full((rank, dim), 1.0 / rank, dtype=dtype, device=device)  # [r, d]
    return u, v
