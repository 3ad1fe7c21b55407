"""The one training loop every stage runs: sample → forward → backward → step, with the rest.

Reads top to bottom: optimizer and schedule → resume → for each step: accumulate micro-batches,
average gradients across ranks, clip, step; log, validate (keeping the best prompts),
checkpoint. A checkpoint holds the prompt parameters, optimizer, scheduler, RNG, step and data
position (the micro-batch counter: batches are a pure function of it, see MixtureSampler), so
``--resume`` continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prompts import Backbone
from trainer.bank import PromptBank
from trainer.data import MixtureSampler, Tokenized
from trainer.distributed import Dist, average_gradients, broadcast_parameters
from trainer.errors import TrainerError
from trainer.forward import Batch, autocast, collate, cross_entropy, prompted_forward
from trainer.options import TrainOptions
from trainer.progress import Progress

# (batch on device) → (loss to minimise, named scalars to log)
Objective = Callable[[Batch], tuple[Tensor, dict[str, float]]]
# (step just finished, its log record or None) → None; may raise to stop the run (the worker:
# a cancelled job, a lost lease, a time limit)
StepHook = Callable[[int, dict[str, Any] | None], None]


@dataclass
class TaskData:
    name: str
    train: list[Tokenized]
    validation: list[Tokenized]


@dataclass
class TrainResult:
    steps: int
    best_step: int | None
    best_val_loss: float | None
    final_val_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False  # --stop-after: the run is not finished, resume it later


def make_optimizer(params: list[torch.nn.Parameter], opts: TrainOptions) -> torch.optim.Optimizer:
    if opts.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=opts.lr,
            weight_decay=opts.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)


def lr_factor(step: int, opts: TrainOptions) -> float:
    """Multiplier of --lr at ``step``: linear warmup, then linear/cosine decay to 0 or constant."""
    if step < opts.warmup_steps:
        return (step + 1) / (opts.warmup_steps + 1)
    if opts.schedule == "constant":
        return 1.0
    progress = (step - opts.warmup_steps) / max(1, opts.steps - opts.warmup_steps)
    if opts.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


@torch.no_grad()
def validation_loss(
    backbone: Backbone,
    bank: PromptBank,
    tasks: list[TaskData],
    opts: TrainOptions,
    device: torch.device,
) -> float | None:
    """Mean over tasks of the token cross-entropy on (up to --eval-limit) validation examples."""
    losses = []
    for k, task in enumerate(tasks):
        rows = task.validation[: opts.eval_limit]
        if not rows:
            continue
        total, tokens = 0.0, 0
        for start in range(0, len(rows), opts.batch_size):
            chunk = rows[start : start + opts.batch_size]
            batch = collate(
                chunk,
                [k] * len(chunk),
                causal=not backbone.is_seq2seq,
                pad_id=backbone.tokenizer.pad_token_id,
            ).to(device)
            with autocast(device, opts.precision):
                out = prompted_forward(backbone, bank(batch.task_index), batch)
            n = out.targets.numel()
            total += float(cross_entropy(out)) * n
            tokens += n
        losses.append(total / max(tokens, 1))
    return sum(losses) / len(losses) if losses else None


def _write_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, label: str, step: int) -> None:
    """Drop log lines of ``label`` written after ``step`` by a run that died after its checkpoint."""
    if not path.exists():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip()
        and not (json.loads(line).get("run") == label and json.loads(line).get("step", 0) > step)
    ]
    path.write_text("".join(line + "\n" for line in keep))


def train(
    backbone: Backbone,
    bank: PromptBank,
    tasks: list[TaskData],
    objective: Objective,
    opts: TrainOptions,
    ctx: Dist,
    *,
    label: str,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train the bank's trainable parameters for ``opts.steps`` steps; keeps the best on validation.

    ``label`` names this run inside ``opts.out`` (checkpoints/<label>.pt, log lines): teach
    runs once per task, the other stages once.
    """
    assert opts.out is not None
    device = ctx.device
    params = bank.trainable()
    broadcast_parameters(params, ctx)
    optimizer = make_optimizer(params, opts)
    # fp16 gradients of small prompt losses underflow without loss scaling; bf16 needs none.
    scaler = torch.amp.GradScaler(
        "cuda", enabled=device.type == "cuda" and opts.precision == "fp16"
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, opts))
    sampler = MixtureSampler(
        [len(t.train) for t in tasks],
        temperature=opts.sampling_temperature,
        seed=opts.seed,
        rank=ctx.rank,
        world=ctx.world,
    )
    causal, pad_id = not backbone.is_seq2seq, backbone.tokenizer.pad_token_id
    ckpt_path = opts.out / "checkpoints" / f"{label}.pt"
    log_path = opts.out / "log.jsonl"
    has_validation = any(t.validation for t in tasks)

    step, best_loss, best_step = 0, math.inf, None
    best_params = {k: v.detach().clone() for k, v in bank.state_dict().items()}
    if opts.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["label"] != label or state["world"] != ctx.world:
            raise TrainerError(
                f"{ckpt_path} was written by another run ({state['label']}, "
                f"{state['world']} processes); remove it or drop --resume"
            )
        bank.load_state_dict(state["params"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step, best_loss, best_step = state["step"], state["best_loss"], state["best_step"]
        best_params = state["best_params"]
        if ctx.main:
            _truncate_log(log_path, label, step)
    elif opts.resume and ctx.main:
        print(f"[{label}] --resume: no checkpoint at {ckpt_path}, starting from step 0")

    def checkpoint() -> None:
        if not ctx.main:
            return
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(
            ckpt_path,
            {
                "label": label,
                "world": ctx.world,
                "step": step,
                "micro_batches": step * opts.grad_accum,  # data position
                "params": bank.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "best_loss": best_loss,
                "best_step": best_step,
                "best_params": best_params,
            },
        )

    def validate() -> float | None:
        nonlocal best_loss, best_step, best_params
        loss = validation_loss(backbone, bank, tasks, opts, device)
        if loss is not None and loss < best_loss:
            best_loss, best_step = loss, step
            best_params = {k: v.detach().clone() for k, v in bank.state_dict().items()}
        return loss

    history: list[dict[str, Any]] = []
    stop = opts.steps if opts.stop_after is None else min(opts.steps, step + opts.stop_after)
    # A bar on a terminal; whole lines every 10 s in logs (docker, CI, a file).
    bar = Progress(opts.steps, label, initial=step, enabled=opts.progress and ctx.main)
    window_tokens, window_start = 0, time.perf_counter()
    while step < stop:
        scalars: dict[str, float] = {}
        for micro in range(opts.grad_accum):
            rows = sampler.batch(step * opts.grad_accum + micro, opts.batch_size)
            batch = collate(
                [tasks[t].train[i] for t, i in rows],
                [t for t, _ in rows],
                causal=causal,
                pad_id=pad_id,
            ).to(device)
            with autocast(device, opts.precision):
                loss, parts = objective(batch)
            scaler.scale(loss / opts.grad_accum).backward()
            window_tokens += batch.target_tokens
            for key, value in {"loss": loss.item(), **parts}.items():
                scalars[key] = scalars.get(key, 0.0) + value / opts.grad_accum
        average_gradients(params, ctx)
        scaler.unscale_(optimizer)
        if opts.max_grad_norm > 0:
            scalars["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm))
        scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        elapsed = time.perf_counter() - window_start
        throughput = window_tokens * ctx.world / max(elapsed, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{scalars['loss']:.4f}", tok_s=f"{throughput:.0f}")
        record: dict[str, Any] | None = None
        if step % opts.log_every == 0 or step == opts.steps:
            record = {
                "run": label,
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "target_tokens_per_s": round(throughput, 1),
                **scalars,
            }
            window_tokens, window_start = 0, time.perf_counter()
        if has_validation and opts.eval_every and step % opts.eval_every == 0 and step < opts.steps:
            record = record or {"run": label, "step": step, **scalars}
            record["val_loss"] = validate()
        if record is not None:
            history.append(record)
            if ctx.main:
                _append_log(log_path, record)
        if opts.checkpoint_every and step % opts.checkpoint_every == 0:
            checkpoint()
        if on_step is not None:
            on_step(step, record)
    bar.close()

    if step < opts.steps:  # --stop-after: leave a checkpoint to resume from, export nothing
        checkpoint()
        return TrainResult(step, best_step, None, None, history, stopped_early=True)
    final = validate() if has_validation else None
    if has_validation:
        bank.load_state_dict(best_params)
    checkpoint()
    return TrainResult(step, best_step, None if best_step is None else best_loss, final, history)


def student_ce(backbone: Backbone, bank: PromptBank) -> Objective:
    """Plain prompt-tuning objective: token cross-entropy of the prompted backbone."""

    def objective(batch: Batch) -> tuple[Tensor, dict[str, float]]:
        loss = cross_entropy(prompted_forward(backbone, bank(batch.task_index), batch))
        return loss, {"ce": loss.item()}

    return objective
