"""Model glue: batches of tokenised examples → a forward pass with prepended prompts.

Seq2seq: the encoder reads ``[P; input; pad]``; the decoder is teacher-forced on the target.
Decoder-only: each row is ``input + target``, left-padded, and ``prepend_prompts`` turns
``[pad; x]`` into ``[pad; P; x]`` with positions counting from the first real row, so the
labels (``-100`` everywhere but on target tokens) line up after ``L`` ignored columns.
Only the prompt receives gradients; the backbone is frozen.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from prompts import Backbone, prepend_prompts
from trainer.data import Tokenized

IGNORE = -100


@dataclass
class Batch:
    task_index: Tensor  # [B]   index into the PromptBank's tasks
    input_ids: Tensor  # [B, T] seq2seq: input, right-padded; causal: input+target, left-padded
    attention_mask: Tensor  # [B, T]
    labels: Tensor  # [B, S] seq2seq: target ids (pad = -100); causal [B, T]: -100 off target

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (self.task_index, self.input_ids, self.attention_mask, self.labels)
            )
        )

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def collate(rows: list[Tokenized], task_index: list[int], *, causal: bool, pad_id: int) -> Batch:
    """Pad a micro-batch; the loss masks are the ``-100`` entries of ``labels``."""
    batch = len(rows)
    if not causal:
        width = max(len(r.input_ids) for r in rows)
        target_width = max(len(r.target_ids) for r in rows)
        ids = torch.full((batch, width), pad_id, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full((batch, target_width), IGNORE, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r.input_ids)] = torch.tensor(r.input_ids)
            mask[b, : len(r.input_ids)] = 1
            labels[b, : len(r.target_ids)] = torch.tensor(r.target_ids)
        return Batch(torch.tensor(task_index), ids, mask, labels)
    width = max(len(r.input_ids) + len(r.target_ids) for r in rows)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        seq = r.input_ids + r.target_ids
        start = width - len(seq)  # left padding
        ids[b, start:] = torch.tensor(seq)
        mask[b, start:] = 1
        labels[b, width - len(r.target_ids) :] = torch.tensor(r.target_ids)
    return Batch(torch.tensor(task_index), ids, mask, labels)


@dataclass
class Output:
    logits: Tensor  # [N, V] logits that predict the N target tokens of the batch
    targets: Tensor  # [N]
    hidden: Tensor | None  # [M, d] last hidden states (see ``prompted_forward``)


def autocast(device: torch.device, precision: str) -> Any:
    """bf16/fp16 autocast on GPU; CPU always runs fp32 (CPU half precision is slow and lossy)."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def prompted_forward(
    backbone: Backbone, prompts: Tensor | None, batch: Batch, *, hidden: bool = False
) -> Output:
    """Forward ``batch`` with ``prompts`` [B, L, d] (or none) in front of every input.

    Hidden states, when asked for: seq2seq → the encoder's last hidden state over the input
    tokens (the prompt acts on the encoder; the decoder is covered by the logits);
    decoder-only → the last layer over the input and target tokens. Prompt rows are excluded
    so that teachers and students with different prompt lengths compare position by position.
    """
    model = backbone.model
    embeds = backbone.embed(batch.input_ids)  # [B, T, d]
    length = 0 if prompts is None else prompts.shape[1]
    if backbone.is_seq2seq:
        mask = batch.attention_mask
        if prompts is not None:
            embeds, mask, _ = prepend_prompts(embeds, mask, prompts, causal=False)
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=batch.labels)
        select = batch.labels != IGNORE  # [B, S]
        logits = out.logits[select]
        states = (
            out.encoder_last_hidden_state[:, length:][batch.attention_mask.bool()]
            if hidden
            else None
        )
        return Output(
            logits.float(), batch.labels[select], None if states is None else states.float()
        )
    if prompts is not None:
        embeds, mask, positions = prepend_prompts(
            embeds, batch.attention_mask, prompts, causal=True
        )
    else:
        mask = batch.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp_min(0) * mask
    # Targets sit at the right end of every row (left padding), so only the last ``keep``
    # positions need logits: the LM head over a 50K vocabulary at every position is a large
    # share of a small model's step.
    keep = _logits_to_keep(model, batch.labels)
    extra = {} if keep is None else {"logits_to_keep": keep}
    out = model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        output_hidden_states=hidden,
        use_cache=False,
        **extra,
    )
    pad = torch.full(
        (batch.labels.shape[0], length), IGNORE, dtype=torch.long, device=batch.labels.device
    )
    labels = torch.cat([pad, batch.labels], dim=1)[:, 1:]  # [B, L+T-1] next-token targets
    if keep is not None:
        labels = labels[:, labels.shape[1] - (keep - 1) :]  # [B, keep-1]
    select = labels != IGNORE
    logits = out.logits[:, :-1][select]
    states = None
    if hidden:
        token_mask = torch.cat([torch.zeros_like(pad), batch.attention_mask], dim=1).bool()
        states = out.hidden_states[-1][token_mask].float()
    return Output(logits.float(), labels[select], states)


def _logits_to_keep(model: Any, labels: Tensor) -> int | None:
    """How many trailing positions hold every target's logits (None: the model computes all).

    The logit at position j predicts token j + 1, so targets starting at column ``first``
    need the positions from ``first - 1`` on: ``T - first + 1`` of them.
    """
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return None
    has_target = (labels != IGNORE).any(0).nonzero()
    if has_target.numel() == 0:
        return None
    return labels.shape[1] - int(has_target[0]) + 1


def cross_entropy(out: Output) -> Tensor:
    """Mean token cross-entropy over the batch's target tokens."""
    return F.cross_entropy(out.logits, out.targets)


def distill_kl(student: Output, teacher: Output, temperature: float) -> Tensor:
    """KL(teacher ‖ student) of the softened token distributions, × T² (Hinton et al.)."""
    t = temperature
    log_student = F.log_softmax(student.logits / t, dim=-1)
    log_teacher = F.log_softmax(teacher.logits / t, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * t * t
