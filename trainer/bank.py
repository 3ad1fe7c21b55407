"""The prompt parameters being trained: shared prompts and each task's factors.

Every stage is this one module with different parts frozen:

- teach: one shared prompt per task (trained), identity factors (frozen) → P_k = P_k.
- distill: one shared prompt and every task's U, V, all trained.
- adapt factors-only: the served shared prompt frozen, the new tasks' U, V trained.
- adapt paper / multi-target: a copy of the shared prompt and the new U, V trained.

Task prompts are composed with ``prompts.compose.compose_rows``, as the server composes them.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from prompts import SharedPrompt, TaskFactors
from prompts.compose import compose_rows


class PromptBank(nn.Module):
    """Shared prompts ``[L, d]`` by id and task factors ``u [L, r]``, ``v [r, d]`` by name."""

    def __init__(
        self,
        shared: dict[str, Tensor],
        tasks: dict[str, tuple[str, Tensor, Tensor]],
        *,
        train_shared: bool,
        train_factors: bool,
    ) -> None:
        super().__init__()
        self.shared_ids = list(shared)
        self.task_names = list(tasks)
        self.task_shared = [self.shared_ids.index(tasks[t][0]) for t in self.task_names]
        self.shared = nn.ParameterList(
            nn.Parameter(p.detach().float().clone(), requires_grad=train_shared)
            for p in shared.values()
        )
        self.u = nn.ParameterList(
            nn.Parameter(tasks[t][1].detach().float().clone(), requires_grad=train_factors)
            for t in self.task_names
        )
        self.v = nn.ParameterList(
            nn.Parameter(tasks[t][2].detach().float().clone(), requires_grad=train_factors)
            for t in self.task_names
        )

    def forward(self, task_index: Tensor) -> Tensor:
        """Prompts [B, L, d] for the rows' tasks ``task_index`` [B]."""
        rows = task_index.tolist()
        prompts = compose_rows(
            list(self.shared),
            [self.task_shared[t] for t in rows],
            [self.u[t] for t in rows],
            [self.v[t] for t in rows],
        )  # each [L, d]
        return torch.stack(prompts)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def digest(self) -> str:
        """sha256 of every parameter's bytes, to compare processes or runs bit for bit."""
        h = hashlib.sha256()
        for name, p in self.named_parameters():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def export(
        self,
        backbone: str,
        meta: dict,
        *,
        shared_ids: list[str] | None = None,
        task_meta: dict[str, dict] | None = None,
    ) -> tuple[list[SharedPrompt], list[TaskFactors]]:
        """Artifacts for the given shared ids (default all) and every task."""
        keep = self.shared_ids if shared_ids is None else shared_ids
        shared = [
            SharedPrompt(
                id=i,
                prompt=self.shared[self.shared_ids.index(i)].detach().cpu().clone(),
                backbone=backbone,
                meta=meta,
            )
            for i in keep
        ]
        tasks = [
            TaskFactors(
                name=t,
                shared=self.shared_ids[self.task_shared[k]],
                u=self.u[k].detach().cpu().clone(),
                v=self.v[k].detach().cpu().clone(),
                backbone=backbone,
                meta={**meta, **(task_meta or {}).get(t, {})},
            )
            for k, t in enumerate(self.task_names)
        ]
        return shared, tasks


def ones_factors(
    length: int, dim: int, rank: int, noise: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``U @ V ≈ 1``: each of the r products is 1/r, times (1 + noise)."""
    u = torch.ones(length, rank) * (1 + noise * torch.randn(length, rank, generator=generator))
    v = torch.full((rank, dim), 1.0 / rank) * (
        1 + noise * torch.randn(rank, dim, generator=generator)
    )
    return u, v  # [L, r], [r, d]


def peft_factors(
    length: int, dim: int, rank: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """PEFT's init: U, V ~ N(0, 0.02²), so the task prompt starts near zero."""
    u = 0.02 * torch.randn(length, rank, generator=generator)
    v = 0.02 * torch.randn(rank, dim, generator=generator)
    return u, v
