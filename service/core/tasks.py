"""A task as the engine runs it: its factors and shared prompt, resolved by the factor store."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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

    @classmethod
    def without_prompt(
        cls, name: str, dim: int, *, device: torch.device | str = "cpu", dtype: torch.dtype
    ) -> ResolvedTask:
        """The base model served as a task of its own: no prompt rows (L = 0)."""
        empty = torch.zeros(0, dim, device=device, dtype=dtype)  # [0, d]
        return cls(
            name, 0, "", empty, empty[:, :1], torch.zeros(1, dim, device=device, dtype=dtype)
        )
