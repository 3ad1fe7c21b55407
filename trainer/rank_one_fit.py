"""Closed-form MPT init: the teachers' prompts written as ``P ⊙ (u_k v_k)`` (rank one).

With a shared prompt ``P = 1_L ⊗ p`` whose entries are all positive (``p`` = the teachers'
mean absolute value per column), ``t_k / P`` is an [L, d] matrix per teacher ``t_k``; its best
rank-one approximation (SVD) gives ``u_k`` [L, 1], ``v_k`` [1, d] with
``P ⊙ (u_k v_k) ≈ t_k`` (exact when ``t_k / P`` is rank one, e.g. every row of ``t_k`` the
same embedding). ``distill --factor-init fit`` starts from it, so distillation begins close
to the teachers instead of from a prompt that knows no task.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rank_one_fit(teachers: Tensor, eps: float = 1e-3) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """``P`` [L, d] and each task's ``(u [L, 1], v [1, d])`` with ``P ⊙ (u v) ≈ teachers[k]``.

    ``teachers`` is [K, L, d]. Each ``u`` is scaled to mean 1 (the ones-init convention), its
    scale moved into ``v``.
    """
    _, length, dim = teachers.shape
    p = teachers.abs().mean(dim=(0, 1)).clamp_min(eps)  # [d], > 0
    shared = p.expand(length, dim).clone()  # [L, d]
    factors = []
    for teacher in teachers:
        ratio = teacher / shared  # [L, d]
        left, sing, right = torch.linalg.svd(ratio, full_matrices=False)
        u = left[:, :1] * sing[0]  # [L, 1]
        v = right[:1, :]  # [1, d]
        if u.mean() < 0:  # keep u positive
            u, v = -u, -v
        scale = u.mean()
        factors.append(((u / scale).contiguous(), (v * scale).contiguous()))
    return shared, factors
