"""What every stage does before and after its loop: backbone, data, prompt init, run.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prompts import Backbone, SharedPrompt, TaskFactors, load_backbone, save_shared, save_task
from prompts.artifacts import utc_now
from trainer.bank import PromptBank
from trainer.config import options_dict
from trainer.data import discover_tasks, few_shot, load_split, tokenize
from trainer.distributed import Dist, init_distributed
from trainer.errors import TrainerError
from trainer.init_text import text_init_rows
from trainer.loop import TaskData
from trainer.options import AdaptOptions, DataOptions, TrainOptions


def start(opts: DataOptions) -> tuple[Dist, Backbone]:
    """Join torchrun's group (if any), seed, load the frozen backbone on this rank's device."""
    ctx = init_distributed(opts.device)
    torch.manual_seed(opts.seed)
    assert opts.model is not None
    backbone = load_backbone(opts.model, device=ctx.device)
    if isinstance(opts, TrainOptions) and not isinstance(opts, AdaptOptions):
        check_sequence_fits(backbone, opts.prompt_length, opts)  # adapt: L of its source
    return ctx, backbone


def load_tasks(
    opts: DataOptions, backbone: Backbone, *, with_validation: bool = True
) -> list[TaskData]:
    """Train (few-shot sampled) and validation examples of every task, tokenised."""
    assert opts.data_dir is not None
    names = discover_tasks(opts.data_dir, opts.tasks)
    tasks = []
    for name in names:
        train = few_shot(load_split(opts.data_dir, name, "train"), opts.shots, opts.seed, name)
        validation = (
            load_split(opts.data_dir, name, "validation", required=False) if with_validation else []
        )
        validation = validation[: opts.eval_limit]
        tokens = {
            split: tokenize(
                backbone.tokenizer,
                examples,
                max_input_length=opts.max_input_length,
                max_target_length=opts.max_target_length,
                causal=not backbone.is_seq2seq,
            )
            for split, examples in (("train", train), ("validation", validation))
        }
        tasks.append(TaskData(name, tokens["train"], tokens["validation"]))
    return tasks


def check_sequence_fits(backbone: Backbone, prompt_length: int, opts: DataOptions) -> None:
    """Decoder-only models see prompt + input + target in one sequence of bounded length."""
    limit = backbone.max_positions
    needed = prompt_length + opts.max_input_length + opts.max_target_length
    if limit is not None and needed > limit:
        raise TrainerError(
            f"prompt length {prompt_length} + --max-input-length {opts.max_input_length} + "
            f"--max-target-length {opts.max_target_length} = {needed} positions, but "
            f"{backbone.name} has {limit}; shorten one of them"
        )


def check_prompt_fits(prompt: Tensor, backbone: Backbone, what: str) -> None:
    if prompt.dim() != 2 or prompt.shape[1] != backbone.dim:
        raise TrainerError(
            f"{what}: prompt of shape {list(prompt.shape)} does not fit backbone "
            f"{backbone.name} (expected [L, {backbone.dim}]); it was trained for "
            "another model"
        )


def init_prompt(
    kind: str,
    length: int,
    backbone: Backbone,
    generator: torch.Generator,
    *,
    scale: float = 0.5,
    text: str | None = None,
) -> Tensor:
    """A fresh prompt [L, d]: random vocabulary embeddings, uniform noise, or a text's embeddings."""
    if kind == "random":
        return (torch.rand(length, backbone.dim, generator=generator) * 2 - 1) * scale
    if kind == "text":
        return text_init_rows(backbone, text or "", length)
    model: Any = backbone.model
    table = model.get_input_embeddings().weight.detach().float().cpu()  # [V, d]
    # Lester et al. sample from the 5,000 most frequent tokens; without frequencies, the first
    # 5,000 ids (BPE vocabularies put frequent merges early) stand in.
    ids = torch.randint(0, min(5000, table.shape[0]), (length,), generator=generator)
    return table[ids].clone()


def save_artifacts(out: Path, shared: list[SharedPrompt], tasks: list[TaskFactors]) -> list[str]:
    paths = [save_shared(out, sp) for sp in shared] + [save_task(out, tf) for tf in tasks]
    return [str(p.relative_to(out)) for p in paths]


def write_run_json(out: Path, stage: str, opts: Any, backbone: Backbone, **extra: Any) -> Path:
    """``run.json``: the stage, its full options, the backbone and what the run measured."""
    record = {
        "stage": stage,
        "created": utc_now(),
        "backbone": backbone.name,
        "backbone_fingerprint": backbone.fingerprint,
        "backbone_kind": backbone.kind,
        "dim": backbone.dim,
        "config": options_dict(opts),
        **extra,
    }
    path = out / "run.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def write_rank_digest(out: Path, label: str, bank: PromptBank, ctx: Dist) -> None:
    """Under torchrun, every rank writes the sha256 of its prompt parameters to
    ``<out>/ddp/<label>.rank<r>.sha256``: identical files mean the ranks stayed in sync."""
    if ctx.world > 1:
        (out / "ddp").mkdir(parents=True, exist_ok=True)
        (out / "ddp" / f"{label}.rank{ctx.rank}.sha256").write_text(bank.digest() + "\n")
