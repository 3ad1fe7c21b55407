"""Prepending soft prompts to token embeddings, with masks and positions right under padding.

Seq2seq (encoder side): ``[P; x; pad]`` — the prompt right in front of the input, pads last,
whatever the input's padding side: a pad between prompt and input would shift the relative
(T5) or absolute (BART) positions of the input and change what a row decodes in a batch.
Decoder-only: ``[pad; P; x]`` — left padding in front of the prompt, so the tokens to be
continued sit at the right edge of every row and positions count from the first real row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PromptedInputs(NamedTuple):
    inputs_embeds: Tensor  # [B, L + T, d]
    attention_mask: Tensor  # [B, L + T], 1 = attend
    position_ids: Tensor | None  # [B, L + T] for decoder-only, None for seq2seq


def prepend_prompts(
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    prompts: Tensor,
    *,
    causal: bool,
    prompt_mask: Tensor | None = None,
) -> PromptedInputs:
    """Put ``prompts`` [B, L, d] in front of ``inputs_embeds`` [B, T, d].

    ``attention_mask`` [B, T] marks real tokens; the input may be padded on either side, the
    prompt rows are always attended. For seq2seq the result is right-padded (prompt, tokens,
    then pads). For decoder-only it is left-padded (pads, then prompt, then tokens), with
    position ids counting real rows only (pads get position 0, they are masked anyway).

    ``prompt_mask`` [B, L] (1 = a real prompt row, default all): rows whose tasks have prompts
    of different lengths (L = 0 included) pad theirs to L; those pads move with the others.
    """
    if prompts.dim() != 3 or inputs_embeds.dim() != 3:
        raise ValueError(
            f"expected prompts [B, L, d] and inputs_embeds [B, T, d], got "
            f"{tuple(prompts.shape)} and {tuple(inputs_embeds.shape)}"
        )
    if prompts.shape[0] != inputs_embeds.shape[0] or prompts.shape[2] != inputs_embeds.shape[2]:
        raise ValueError(
            f"prompts {tuple(prompts.shape)} do not fit inputs_embeds {tuple(inputs_embeds.shape)}"
        )
    batch, length, _ = prompts.shape
    if prompt_mask is None:
        prompt_mask = torch.ones(
            batch, length, dtype=attention_mask.dtype, device=attention_mask.device
        )
    elif tuple(prompt_mask.shape) != (batch, length):
        raise ValueError(
            f"prompt_mask {tuple(prompt_mask.shape)} does not fit prompts {tuple(prompts.shape)}"
        )
    else:
        prompt_mask = prompt_mask.to(attention_mask.dtype)
    embeds = torch.cat([prompts.to(inputs_embeds.dtype), inputs_embeds], dim=1)  # [B, L+T, d]
    mask = torch.cat([prompt_mask, attention_mask], dim=1)  # [B, L+T]
    # A stable sort on the mask moves every pad to one side while keeping the
    # prompt-then-tokens order of the real rows: pads last for seq2seq, first for causal.
    real = (mask != 0).long()  # [B, L+T], also for bool masks
    order = torch.argsort(real if causal else 1 - real, dim=1, stable=True)  # [B, L+T]
    embeds = torch.gather(embeds, 1, order[..., None].expand_as(embeds))
    mask = torch.gather(mask, 1, order)
    if not causal:
        return PromptedInputs(embeds, mask, None)
    return PromptedInputs(embeds, mask, position_ids_from_mask(mask))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions [B, T] counting attended rows from 0; masked rows get 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0) * attention_mask.long()
