"""Stage 3, adapt: new target task(s) on top of a distilled shared prompt (MPT §3.3).

Every target task's U, V start from the factors whose composed prompt is closest to the text
init of its instruction (``--factor-init fit``; ``auto``, the default, does so for every task
with an instruction), else from the average of the source tasks' factors (or ones/peft).
Modes:

- ``factors-only`` (default): P is frozen and stays bit-identical; only (L + d)·r numbers per
  task train. The task blobs reference the source's shared id, whose blob is copied unchanged
  into ``<out>/shared/`` so the folder is servable on its own.
- ``paper``: P is fine-tuned too, per task; each task gets a new shared prompt
  ``<source id>-<task>`` (or ``--new-shared-id``).
- ``multi-target``: all target tasks jointly with one new shared prompt for the group
  (``<source id>-mt`` or ``--new-shared-id``), the paper's MPT-MT.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from prompts import Backbone, SharedPrompt, TaskFactors, check_name, load_artifact_dir, shared_path
from trainer.bank import PromptBank, ones_factors, peft_factors
from trainer.choose import fit_factors
from trainer.data import stable_seed
from trainer.distributed import Dist
from trainer.errors import TrainerError
from trainer.init_text import INSTRUCTION_FILE, resolve_init_texts, text_init_rows
from trainer.loop import StepHook, TaskData, student_ce, train
from trainer.options import AdaptOptions
from trainer.plots import plot_losses
from trainer.setup import (
    check_prompt_fits,
    check_sequence_fits,
    load_tasks,
    save_artifacts,
    start,
    write_rank_digest,
    write_run_json,
)


@dataclass
class Source:
    shared: SharedPrompt
    tasks: list[TaskFactors]  # the source tasks composed over ``shared``
    path: Path


def load_source(path: Path, shared_id: str | None, backbone: Backbone) -> Source:
    """The shared prompt to adapt from and the source factors over it."""
    if not path.is_dir():
        raise TrainerError(f"source folder {path} does not exist (the --out of `distill`)")
    found = load_artifact_dir(path, backbone=backbone.fingerprint)
    if shared_id is None:
        if len(found.shared) != 1:
            raise TrainerError(
                f"{path} holds {len(found.shared)} shared prompts "
                f"({sorted(found.shared)}); choose one with --shared-id"
            )
        shared_id = next(iter(found.shared))
    if shared_id not in found.shared:
        raise TrainerError(
            f"no shared prompt {shared_id!r} in {path / 'shared'} "
            f"(found: {sorted(found.shared) or 'none'})"
        )
    shared = found.shared[shared_id]
    check_prompt_fits(shared.prompt, backbone, f"shared prompt {shared_id!r} in {path}")
    tasks = [tf for tf in found.tasks.values() if tf.shared == shared_id]
    return Source(shared, tasks, path)


def initial_factors(
    source: Source, opts: AdaptOptions, dim: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """U [L, r], V [r, d] to start a target task without an instruction from (``auto`` and
    ``source``: the source average)."""
    length = source.shared.length
    if opts.factor_init in ("auto", "source"):
        if not source.tasks:
            raise TrainerError(
                f"{source.path} has no task factors over {source.shared.id!r} to "
                "average; use --factor-init ones or peft"
            )
        ranks = {tf.rank for tf in source.tasks}
        if len(ranks) > 1:
            raise TrainerError(f"source tasks have different ranks {sorted(ranks)}; cannot average")
        u = torch.stack([tf.u.float() for tf in source.tasks]).mean(0)  # [L, r]
        v = torch.stack([tf.v.float() for tf in source.tasks]).mean(0)  # [r, d]
        return u, v
    if opts.factor_init == "ones":
        return ones_factors(length, dim, opts.rank, opts.factor_noise, generator)
    return peft_factors(length, dim, opts.rank, generator)


def task_starts(
    source: Source,
    opts: AdaptOptions,
    backbone: Backbone,
    names: list[str],
    generator: torch.Generator,
) -> dict[str, tuple[Tensor, Tensor, str]]:
    """Each task's U [L, r], V [r, d] at step 0 and the init's name: the fit to its
    instruction's text init (``fit``; ``auto`` where it has an instruction), else
    ``initial_factors``."""
    texts = resolve_init_texts(
        names, text=opts.init_text, mapping_file=opts.init_texts, data_dir=opts.data_dir
    )
    missing = [t for t, text in texts.items() if text is None]
    if opts.factor_init == "fit" and missing:
        raise TrainerError(
            f"--factor-init fit: no instruction for task(s) {', '.join(missing)}; give "
            f"--init-text, --init-texts FILE or write <data-dir>/<task>/{INSTRUCTION_FILE}"
        )
    fits = opts.factor_init in ("auto", "fit")
    fallback = "source" if opts.factor_init == "auto" else opts.factor_init
    common = None
    if missing or not fits:
        common = initial_factors(source, opts, backbone.dim, generator)
    out: dict[str, tuple[Tensor, Tensor, str]] = {}
    prompt = source.shared.prompt.float()
    for name, text in texts.items():
        if text is not None and fits:
            rows = text_init_rows(backbone, text, source.shared.length)
            out[name] = (*fit_factors(prompt, rows, opts.rank), "fit")
        else:
            assert common is not None
            out[name] = (*common, fallback)
    return out


def run(opts: AdaptOptions) -> int:
    ctx, backbone = start(opts)
    return adapt(opts, ctx, backbone)


def adapt(
    opts: AdaptOptions, ctx: Dist, backbone: Backbone, *, on_step: StepHook | None = None
) -> int:
    """The stage on an already loaded backbone (``rankone worker`` keeps one loaded)."""
    assert opts.out is not None and opts.source is not None
    source = load_source(opts.source, opts.shared_id, backbone)
    # L is the source's (--prompt-length does not apply): run.json and the checks say so
    opts.prompt_length = source.shared.length
    check_sequence_fits(backbone, opts.prompt_length, opts)
    tasks = load_tasks(opts, backbone)
    opts.out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(stable_seed(opts.seed, "adapt"))
    starts = task_starts(source, opts, backbone, [t.name for t in tasks], generator)
    src_id = source.shared.id

    # Groups of tasks trained together, and the shared id each group's tasks will reference.
    groups: list[tuple[str, list[TaskData]]]
    if opts.mode == "paper":
        if opts.new_shared_id and len(tasks) > 1:
            raise TrainerError(
                "--new-shared-id names one prompt, but --mode paper writes one per "
                "task; drop it or use --mode multi-target"
            )
        groups = [(opts.new_shared_id or f"{src_id}-{t.name}", [t]) for t in tasks]
    elif opts.mode == "multi-target":
        groups = [(opts.new_shared_id or f"{src_id}-mt", tasks)]
    else:
        groups = [(src_id, tasks)]
    for shared_id, _ in groups:
        check_name(shared_id, "new shared prompt id")

    train_shared = opts.mode != "factors-only"
    metrics, history, artifacts = {}, {}, []
    for shared_id, group in groups:
        label = f"adapt-{shared_id}"
        factors = {t.name: (shared_id, *starts[t.name][:2]) for t in group}
        bank = PromptBank(
            {shared_id: source.shared.prompt},
            factors,
            train_shared=train_shared,
            train_factors=True,
        ).to(ctx.device)
        objective = student_ce(backbone, bank)
        result = train(backbone, bank, group, objective, opts, ctx, label=label, on_step=on_step)
        if result.stopped_early:
            print(
                f"stopped after step {result.steps} of {opts.steps} (--stop-after); "
                "continue with --resume"
            )
            return 0
        write_rank_digest(opts.out, label, bank, ctx)
        history[label] = result.history
        metrics[label] = {
            "tasks": [t.name for t in group],
            "factor_init": {t.name: starts[t.name][2] for t in group},
            "best_step": result.best_step,
            "best_val_loss": result.best_val_loss,
            "final_val_loss": result.final_val_loss,
            "trained_parameters": sum(p.numel() for p in bank.trainable()),
        }
        if ctx.main:
            meta = {
                "stage": "adapt",
                "mode": opts.mode,
                "method": "mpt",
                "source": str(opts.source),
                "source_shared": src_id,
            }
            shared_out, tasks_out = bank.export(
                backbone.fingerprint, meta, shared_ids=[shared_id] if train_shared else []
            )
            artifacts += save_artifacts(opts.out, shared_out, tasks_out)
            if not train_shared:
                # The served shared prompt, byte for byte: the new tasks compose with it.
                target = shared_path(opts.out, src_id)
                target.parent.mkdir(parents=True, exist_ok=True)
                if shared_path(source.path, src_id).resolve() != target.resolve():
                    shutil.copyfile(shared_path(source.path, src_id), target)
                artifacts.append(str(target.relative_to(opts.out)))
    if ctx.main:
        plot_losses(history, opts.out / "loss.png", f"adapt ({opts.mode})")
        write_run_json(
            opts.out,
            "adapt",
            opts,
            backbone,
            world_size=ctx.world,
            mode=opts.mode,
            source_shared=src_id,
            source_tasks=[tf.name for tf in source.tasks],
            metrics=metrics,
            artifacts=artifacts,
        )
        print(f"adapt ({opts.mode}): {len(tasks)} task(s) written to {opts.out}")
    return 0
