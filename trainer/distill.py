"""Stage 2, distill: MPT source training (Wang et al. 2023, §3.2).

One shared prompt P [L, d] and every source task's factors U_k [L, r], V_k [r, d] are learned
jointly on the mixture of source tasks (examples-proportional sampling with a temperature).
Each task's prompt P ⊙ (U_k @ V_k) is distilled from that task's teacher prompt (from `teach`):

    loss = CE + λ_kl · T² · KL(teacher_T ‖ student_T) + λ_hid · MSE(h_teacher, h_student)

KL over the output token distributions at every target position (teacher-forced, temperature
T); hidden states are the encoder's last hidden states over the input tokens for seq2seq
models and the last layer over the input and target tokens for decoder-only ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from prompts import Backbone, compose_prompt, load_artifact_dir
from trainer.bank import PromptBank, ones_factors, peft_factors
from trainer.data import stable_seed
from trainer.errors import TrainerError
from trainer.forward import Batch, cross_entropy, distill_kl, prompted_forward
from trainer.loop import Objective, train
from trainer.options import DistillOptions
from trainer.plots import plot_losses
from trainer.rank_one_fit import rank_one_fit
from trainer.setup import (
    check_prompt_fits,
    init_prompt,
    load_tasks,
    save_artifacts,
    start,
    write_rank_digest,
    write_run_json,
)


def teacher_prompts(path: Path, tasks: list[str], backbone: Backbone) -> Tensor:
    """Each task's composed teacher prompt, stacked → [K, L, d]."""
    if not path.is_dir():
        raise TrainerError(f"teacher folder {path} does not exist (the --out of `teach`)")
    found = load_artifact_dir(path, backbone=backbone.fingerprint)
    prompts = []
    for task in tasks:
        if task not in found.tasks:
            raise TrainerError(
                f"no teacher for task {task!r} in {path / 'tasks'}: run `teach` on it "
                f"first (found: {sorted(found.tasks) or 'none'})"
            )
        factors = found.tasks[task]
        prompt = compose_prompt(
            found.shared[factors.shared].prompt.float(), factors.u.float(), factors.v.float()
        )
        check_prompt_fits(prompt, backbone, f"teacher of {task!r} in {path}")
        prompts.append(prompt)
    if len({p.shape[0] for p in prompts}) > 1:
        raise TrainerError(
            f"teachers in {path} have different prompt lengths "
            f"{sorted({p.shape[0] for p in prompts})}; teach them with one --prompt-length"
        )
    return torch.stack(prompts)


def distill_objective(
    backbone: Backbone, bank: PromptBank, teachers: Tensor, opts: DistillOptions
) -> Objective:
    hidden = opts.lambda_hid > 0

    def objective(batch: Batch) -> tuple[Tensor, dict[str, float]]:
        student = prompted_forward(backbone, bank(batch.task_index), batch, hidden=hidden)
        if opts.lambda_kl == 0 and not hidden:  # decomposition only: no teacher forward
            ce = cross_entropy(student)
            return ce, {"ce": ce.item()}
        with torch.no_grad():
            teacher = prompted_forward(backbone, teachers[batch.task_index], batch, hidden=hidden)
        ce = cross_entropy(student)
        kl = distill_kl(student, teacher, opts.kl_temperature)
        loss = ce + opts.lambda_kl * kl
        parts = {"ce": ce.item(), "kl": kl.item()}
        if hidden:
            assert student.hidden is not None and teacher.hidden is not None
            mse = F.mse_loss(student.hidden, teacher.hidden)
            loss = loss + opts.lambda_hid * mse
            parts["hidden_mse"] = mse.item()
        return loss, parts

    return objective


def initial_parameters(
    opts: DistillOptions, backbone: Backbone, names: list[str], teachers: Tensor
) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """P [L, d] and every task's (U [L, r], V [r, d]) at step 0, by --init-from/--factor-init."""
    if opts.init_from is not None:
        return parameters_from(opts.init_from, names, backbone, teachers.shape[1], opts.rank)
    if opts.factor_init == "fit":
        shared, fitted = rank_one_fit(teachers)
        return shared, dict(zip(names, fitted, strict=True))
    generator = torch.Generator().manual_seed(stable_seed(opts.seed, "distill"))
    if opts.shared_init == "teachers":
        shared = teachers.mean(0)  # [L, d]
    else:
        shared = init_prompt(opts.shared_init, opts.prompt_length, backbone, generator)
    factors = {}
    for name in names:
        if opts.factor_init == "ones":
            factors[name] = ones_factors(
                opts.prompt_length, backbone.dim, opts.rank, opts.factor_noise, generator
            )
        else:
            factors[name] = peft_factors(opts.prompt_length, backbone.dim, opts.rank, generator)
    return shared, factors


def parameters_from(
    path: Path, names: list[str], backbone: Backbone, length: int, rank: int
) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """--init-from: one shared prompt and the factors of every source task from artifacts."""
    if not path.is_dir():
        raise TrainerError(f"--init-from {path}: folder does not exist")
    found = load_artifact_dir(path, backbone=backbone.fingerprint)
    missing = [n for n in names if n not in found.tasks]
    if missing:
        raise TrainerError(
            f"--init-from {path}: no factors for task(s) {', '.join(missing)} "
            f"(found: {sorted(found.tasks) or 'none'})"
        )
    shared_ids = {found.tasks[n].shared for n in names}
    if len(shared_ids) != 1:
        raise TrainerError(
            f"--init-from {path}: the tasks use several shared prompts {sorted(shared_ids)}; "
            "distill starts from one"
        )
    shared = found.shared[shared_ids.pop()].prompt.float()
    check_prompt_fits(shared, backbone, f"--init-from {path}")
    if shared.shape[0] != length:
        raise TrainerError(
            f"--init-from {path}: its shared prompt has {shared.shape[0]} rows but the "
            f"teachers have {length}"
        )
    factors = {n: (found.tasks[n].u.float(), found.tasks[n].v.float()) for n in names}
    ranks = {u.shape[1] for u, _ in factors.values()}
    if ranks != {rank}:
        raise TrainerError(
            f"--init-from {path}: factors of rank {sorted(ranks)} but --rank is {rank}"
        )
    return shared, factors


def run(opts: DistillOptions) -> int:
    ctx, backbone = start(opts)
    assert opts.out is not None and opts.teachers is not None
    tasks = load_tasks(opts, backbone)
    names = [t.name for t in tasks]
    teachers = teacher_prompts(opts.teachers, names, backbone)  # [K, L, d]
    length = teachers.shape[1]
    if opts.shared_init == "teachers" and length != opts.prompt_length:
        raise TrainerError(
            f"the teachers' prompts have {length} rows but --prompt-length is "
            f"{opts.prompt_length}; pass --prompt-length {length} or another --shared-init"
        )
    opts.out.mkdir(parents=True, exist_ok=True)
    shared, factors = initial_parameters(opts, backbone, names, teachers)
    bank = PromptBank(
        {opts.shared_id: shared},
        {name: (opts.shared_id, u, v) for name, (u, v) in factors.items()},
        train_shared=True,
        train_factors=True,
    ).to(ctx.device)
    objective = distill_objective(backbone, bank, teachers.to(ctx.device), opts)
    result = train(backbone, bank, tasks, objective, opts, ctx, label="distill")
    if result.stopped_early:
        print(
            f"stopped after step {result.steps} of {opts.steps} (--stop-after); continue with --resume"
        )
        return 0
    write_rank_digest(opts.out, "distill", bank, ctx)
    if ctx.main:
        meta = {
            "stage": "distill",
            "method": "mpt",
            "teachers": str(opts.teachers),
            "sources": names,
        }
        shared_out, tasks_out = bank.export(backbone.fingerprint, meta)
        artifacts = save_artifacts(opts.out, shared_out, tasks_out)
        plot_losses(
            {"distill": result.history}, opts.out / "loss.png", "distill: MPT source training"
        )
        last = result.history[-1] if result.history else {}
        metrics = {
            "best_step": result.best_step,
            "best_val_loss": result.best_val_loss,
            "final_val_loss": result.final_val_loss,
            **{f"final_{k}": last[k] for k in ("loss", "ce", "kl", "hidden_mse") if k in last},
            "train_examples": {t.name: len(t.train) for t in tasks},
        }
        write_run_json(
            opts.out,
            "distill",
            opts,
            backbone,
            world_size=ctx.world,
            metrics=metrics,
            artifacts=artifacts,
        )
        print(
            f"distill: shared prompt {opts.shared_id!r} and {len(names)} task(s) written to {opts.out}"
        )
    return 0
