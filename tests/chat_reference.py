"""Reference decoding for chat: HF ``generate(inputs_embeds=[P_k; embed(rendered chat)])``.

Shared by the tiny-model chat tests and the real-model tests (tests/real/).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prompts import Backbone, compose_prompt
from prompts.chat import chat_input_ids


def greedy_reference_ids(
    bb: Backbone, composed: torch.Tensor, ids: Sequence[int], max_new_tokens: int
) -> list[int] | None:
    """Greedy tokens of HF ``generate`` for ``[composed; embed(ids)]`` alone (composed: [L, d]).

    Stops after EOS (excluded). None when a step's top-two logits are within float32 noise of
    each other: a near tie proves nothing about batching.
    """
    input_ids = torch.tensor([list(ids)])  # [1, T]
    embeds = torch.cat([composed[None].to(bb.dtype), bb.embed(input_ids)], dim=1)  # [1, L+T, d]
    with torch.inference_mode():
        out = bb.model.generate(  # type: ignore[operator]
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=bb.tokenizer.pad_token_id,
        )
    tokens: list[int] = out.sequences[0].tolist()
    eos = bb.tokenizer.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    for scores in out.scores[: len(tokens)]:
        top = scores[0].float().topk(2).values
        if float(top[0] - top[1]) <= 1e-5 * float(top.abs().max()) + 1e-4:
            return None
    return tokens[:-1] if tokens and tokens[-1] == eos else tokens


def chat_reference_text(
    bb: Backbone,
    prompt: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    messages: list[dict[str, Any]],
    max_new_tokens: int,
) -> str | None:
    """What a greedy chat completion of ``messages`` must answer for the task (P, u, v)."""
    ids = chat_input_ids(bb.tokenizer, messages)
    tokens = greedy_reference_ids(bb, compose_prompt(prompt, u, v), ids, max_new_tokens)
    return None if tokens is None else str(bb.tokenizer.decode(tokens, skip_special_tokens=True))
