"""Closed-form MPT init for the demo: the teachers' prompts written as ``P ⊙ (u v)``.

The demo teachers start from their task's marker embedding (every row = ``e(m_k)``) and move
little, so each teacher prompt ``t_k`` [L, d] is (nearly) rank one in the MPT sense. With a
shared prompt ``P = 1_L ⊗ p`` whose entries are all positive (``p`` = the teachers' mean
absolute value per column), ``t_k / P`` is (nearly) a rank-one matrix, and its best rank-one
approximation (SVD) gives ``u_k`` [L, 1], ``v_k`` [1, d] with ``P ⊙ (u_k v_k) ≈ t_k``.

The trainer's ``distill`` has no init-from-files option, so the demo seeds it through its own
resume hook: ``distill --stop-after 1`` writes ``checkpoints/distill.pt``;
``seed_distill_checkpoint`` replaces its prompt parameters with the closed form (step 0, fresh
optimizer state) and ``distill --resume`` then trains from there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from prompts import compose_prompt, load_artifact_dir


def teacher_prompts(teachers: Path, tasks: list[str]) -> Tensor:
    """The composed teacher prompt of each task, stacked → [K, L, d] (fp32)."""
    found = load_artifact_dir(teachers)
    out = []
    for task in tasks:
        tf = found.tasks[task]
        out.append(
            compose_prompt(found.shared[tf.shared].prompt.float(), tf.u.float(), tf.v.float())
        )
    return torch.stack(out)


def rank_one_factors(
    teachers: Tensor, eps: float = 1e-3
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """``P`` [L, d] and each task's ``(u [L, 1], v [1, d])`` with ``P ⊙ (u v) ≈ teachers[k]``."""
    k, length, dim = teachers.shape
    p = teachers.abs().mean(dim=(0, 1)).clamp_min(eps)  # [d], > 0
    shared = p.expand(length, dim).clone()
    factors = []
    for i in range(k):
        ratio = teachers[i] / shared  # [L, d]
        left, sing, right = torch.linalg.svd(ratio, full_matrices=False)
        u = left[:, :1] * sing[0]  # [L, 1]
        v = right[:1, :]  # [1, d]
        if u.mean() < 0:  # keep u positive (the ones-init convention)
            u, v = -u, -v
        scale = u.mean()
        factors.append(((u / scale).contiguous(), (v * scale).contiguous()))
    return shared, factors


def seed_distill_checkpoint(
    ckpt_path: Path, shared: Tensor, factors: list[tuple[Tensor, Tensor]]
) -> None:
    """Rewrite a ``distill`` checkpoint so that ``--resume`` starts at step 0 from the closed form."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    params = {"shared.0": shared.clone()}
    for i, (u, v) in enumerate(factors):
        params[f"u.{i}"] = u.clone()
        params[f"v.{i}"] = v.clone()
    if set(params) != set(state["params"]):
        raise RuntimeError(
            f"unexpected distill checkpoint layout: {sorted(state['params'])} in {ckpt_path}"
        )
    for name, value in params.items():
        if value.shape != state["params"][name].shape:
            raise RuntimeError(f"{ckpt_path}: {name} has shape {list(state['params'][name].shape)}")
    state["params"] = params
    state["best_params"] = {n: t.clone() for n, t in params.items()}
    state["best_loss"] = float("inf")
    state["best_step"] = None
    state["step"] = 0
    state["micro_batches"] = 0
    state["optimizer"]["state"] = {}  # Adam moments start afresh
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = group.get("initial_lr", group["lr"])
    sched = state["scheduler"]
    sched["last_epoch"] = 0
    sched["_step_count"] = 1
    torch.save(state, ckpt_path)
