"""Stage 1, teach: plain prompt tuning (Lester et al. 2021), one prompt per source task.

Each task is trained on its own (its own loop, checkpoint and schedule). The result is written
as a shared prompt ``pt-<task>`` plus a task blob ``<task>`` with identity factors
(``U @ V = 1``), so every teacher is also servable as the prompt-tuning baseline.
"""

from __future__ import annotations

import torch

from prompts import identity_factors
from trainer.bank import PromptBank
from trainer.data import stable_seed
from trainer.init_text import init_kinds, resolve_init_texts
from trainer.loop import student_ce, train
from trainer.options import TeachOptions
from trainer.plots import plot_losses
from trainer.setup import (
    init_prompt,
    load_tasks,
    save_artifacts,
    start,
    write_rank_digest,
    write_run_json,
)


def teacher_id(task: str) -> str:
    return f"pt-{task}"


def describe_init(kind: str, text: str | None) -> str:
    if kind != "text" or text is None:
        return kind
    return f"text {text[:60] + '...' if len(text) > 60 else text!r}"


def run(opts: TeachOptions) -> int:
    ctx, backbone = start(opts)
    assert opts.out is not None
    opts.out.mkdir(parents=True, exist_ok=True)
    tasks = load_tasks(opts, backbone)
    texts = resolve_init_texts(
        [t.name for t in tasks],
        text=opts.init_text,
        mapping_file=opts.init_texts,
        data_dir=opts.data_dir,
    )
    kinds = init_kinds(opts.init, texts)
    metrics, history, artifacts = {}, {}, []
    for task in tasks:
        generator = torch.Generator().manual_seed(stable_seed(opts.seed, "teach", task.name))
        prompt = init_prompt(
            kinds[task.name],
            opts.prompt_length,
            backbone,
            generator,
            scale=opts.init_scale,
            text=texts[task.name],
        )  # [L, d]
        if ctx.main:
            print(f"[teach-{task.name}] init: {describe_init(kinds[task.name], texts[task.name])}")
        u, v = identity_factors(opts.prompt_length, backbone.dim)  # [L, 1], [1, d]
        bank = PromptBank(
            {teacher_id(task.name): prompt},
            {task.name: (teacher_id(task.name), u, v)},
            train_shared=True,
            train_factors=False,
        ).to(ctx.device)
        result = train(
            backbone,
            bank,
            [task],
            student_ce(backbone, bank),
            opts,
            ctx,
            label=f"teach-{task.name}",
        )
        if result.stopped_early:
            print(
                f"stopped after step {result.steps} of {opts.steps} (--stop-after); "
                "continue with --resume"
            )
            return 0
        history[task.name] = result.history
        metrics[task.name] = {
            "init": kinds[task.name],
            "init_text": texts[task.name] if kinds[task.name] == "text" else None,
            "train_examples": len(task.train),
            "best_step": result.best_step,
            "best_val_loss": result.best_val_loss,
            "final_val_loss": result.final_val_loss,
            "final_train_loss": result.history[-1]["loss"] if result.history else None,
        }
        if ctx.main:
            meta = {
                "stage": "teach",
                "task": task.name,
                "method": "prompt-tuning",
                "init": kinds[task.name],
                **({"init_text": texts[task.name]} if kinds[task.name] == "text" else {}),
            }
            shared, factors = bank.export(backbone.fingerprint, meta)
            artifacts += save_artifacts(opts.out, shared, factors)
        write_rank_digest(opts.out, f"teach-{task.name}", bank, ctx)
    if ctx.main:
        plot_losses(history, opts.out / "loss.png", "teach: prompt tuning per task")
        write_run_json(
            opts.out,
            "teach",
            opts,
            backbone,
            world_size=ctx.world,
            metrics=metrics,
            artifacts=artifacts,
        )
        print(f"teach: {len(tasks)} teacher prompt(s) written to {opts.out}")
    return 0
