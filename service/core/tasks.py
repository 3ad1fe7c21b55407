"""A task as the engine runs it: its factors and shared prompt, resolved by the factor store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prompts.compose import compose_rows


@dataclass(frozen=True)
class ResolvedTask:
    """A task's factors as the engine needs them, on the model's device and dtype.

    ``version`` changes on every replace, so (name, version) keys any per-task cache
    (e.g. a decoder-only prompt KV prefix).
    """

    name: str
    version: int
    shared_id: str
    prompt: Tensor  # [L, d] the shared prompt
    u: Tensor  # [L, r]
    v: Tensor  # [r, d]

    @property
    def length(self) -> int:
        """L: the task's prompt rows (0 for the base model)."""
        return int(self.prompt.shape[0])

    @classmethod
    def without_prompt(
        cls, name: str, dim: int, *, device: torch.device | str = "cpu", dtype: torch.dtype
    ) -> ResolvedTask:
        """The base model served as a task of its own: no prompt rows (L = 0)."""
        empty = torch.zeros(0, dim, device=device, dtype=dtype)  # [0, d]
        return cls(
            name, 0, "", empty, empty[:, :1], torch.zeros(1, dim, device=device, dtype=dtype)
        )


def compose_tasks(tasks: Sequence[ResolvedTask]) -> list[Tensor]:
    """Each task's prompt [L_t, d] (``prompts.compose.compose_rows``): the one adapter from
    resolved tasks to the composition, for both engines."""
    slots: dict[int, int] = {}  # the shared prompt tensor's id -> its index
    shared: list[Tensor] = []
    index: list[int] = []
    for task in tasks:
        # By the tensor, not the id: two versions of one shared prompt may meet in a batch.
        slot = slots.setdefault(id(task.prompt), len(shared))
        if slot == len(shared):
            shared.append(task.prompt)
        index.append(slot)
    return compose_rows(shared, index, [t.u for t in tasks], [t.v for t in tasks])
