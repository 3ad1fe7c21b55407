"""The fine-tuning reference: LoRA through PEFT on the attention projections, one task at a time.

Not part of the product (rankone serves prompts, not adapters): it is the paper's
"Finetuning" row, trained with the trainer's own batches (``collate``, ``MixtureSampler``) and
loss (``prompted_forward`` without a prompt), the same optimizer, schedule and clipping as the
prompt methods, and the best validation loss kept, so the comparison is on equal terms.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from prompts import Backbone
from trainer.data import MixtureSampler
from trainer.forward import collate, cross_entropy, prompted_forward
from trainer.loop import TaskData, lr_factor
from trainer.options import TrainOptions

TARGET_MODULES = ["q_proj", "v_proj"]


def lora_backbone(
    backbone: Backbone, rank: int, seed: int
) -> tuple[Backbone, list[torch.nn.Parameter]]:
    """A copy of the backbone with LoRA adapters (rank ``rank``, alpha 2·rank) and its params."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGET_MODULES
    )
    peft_model: Any = get_peft_model(copy.deepcopy(backbone.model), config)
    inner = peft_model.base_model.model  # the HF model with LoRA layers in place
    params = [p for n, p in inner.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return dataclasses.replace(backbone, model=inner), params


@torch.no_grad()
def _val_loss(backbone: Backbone, task: TaskData, batch_size: int) -> float:
    total, tokens = 0.0, 0
    pad = backbone.tokenizer.pad_token_id
    for start in range(0, len(task.validation), batch_size):
        chunk = task.validation[start : start + batch_size]
        batch = collate(chunk, [0] * len(chunk), causal=True, pad_id=pad).to(backbone.device)
        out = prompted_forward(backbone, None, batch)
        total += float(cross_entropy(out)) * out.targets.numel()
        tokens += out.targets.numel()
    return total / max(tokens, 1)


def train_lora(
    backbone: Backbone, task: TaskData, opts: TrainOptions, rank: int, out: Path
) -> tuple[Backbone, dict[str, Any]]:
    """Train LoRA on ``task``; the adapted backbone (best validation loss) and a run record."""
    tuned, params = lora_backbone(backbone, rank, opts.seed)
    tuned.model.eval()  # dropout off, as for the frozen prompt-tuned backbone
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, opts))
    sampler = MixtureSampler([len(task.train)], temperature=1.0, seed=opts.seed)
    pad = backbone.tokenizer.pad_token_id
    best, best_step = math.inf, 0
    best_state = [p.detach().clone() for p in params]
    history = []
    for step in range(1, opts.steps + 1):
        rows = sampler.batch(step - 1, opts.batch_size)
        batch = collate([task.train[i] for _, i in rows], [0] * len(rows), causal=True, pad_id=pad)
        loss = cross_entropy(prompted_forward(tuned, None, batch.to(backbone.device)))
        loss.backward()
        if opts.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record: dict[str, Any] = {"run": f"lora-{task.name}", "step": step, "loss": loss.item()}
        if task.validation and (step % max(opts.eval_every, 1) == 0 or step == opts.steps):
            record["val_loss"] = _val_loss(tuned, task, opts.batch_size)
            if record["val_loss"] < best:
                best, best_step = record["val_loss"], step
                best_state = [p.detach().clone() for p in params]
        history.append(record)
    with torch.no_grad():
        for p, b in zip(params, best_state, strict=True):
            p.copy_(b)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return tuned, {
        "best_val_loss": best if best < math.inf else None,
        "best_step": best_step,
        "trained_parameters": sum(p.numel() for p in params),
        "history": history,
    }
