"""Greedy decoding with a prepended prompt, for evaluation.

Written out rather than ``model.generate``: transformers 5.24's ``generate`` fails for T5
configs whose decoder depth differs from the encoder's, and decoder-only models need explicit
position ids once prompt rows sit between left padding and the input.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from prompts import Backbone, prepend_prompts
from trainer.data import Tokenized
from trainer.forward import Batch, collate


@torch.no_grad()
def greedy(
    backbone: Backbone, prompts: Tensor | None, inputs: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """New token ids per row (EOS excluded) for ``inputs`` behind ``prompts`` [B, L, d]."""
    device = backbone.device
    causal = not backbone.is_seq2seq
    pad, eos = backbone.tokenizer.pad_token_id, backbone.tokenizer.eos_token_id
    rows = [Tokenized(ids, []) for ids in inputs]
    batch: Batch = collate(rows, [0] * len(rows), causal=causal, pad_id=pad).to(device)
    embeds = backbone.embed(batch.input_ids)  # [B, T, d]
    mask = batch.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0) * mask
    if prompts is not None:
        prompted = prepend_prompts(embeds, mask, prompts.to(device, embeds.dtype), causal=causal)
        embeds, mask = prompted.inputs_embeds, prompted.attention_mask
        if prompted.position_ids is not None:
            positions = prompted.position_ids
    model: Any = backbone.model
    size = len(inputs)
    done = torch.zeros(size, dtype=torch.bool, device=device)
    out = torch.full((size, max_new_tokens), pad, dtype=torch.long, device=device)
    if not causal:
        encoder = model.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        start = model.config.decoder_start_token_id
        decoded = torch.full((size, 1), start, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            # No KV cache: target lengths are short and this avoids cache shape corner cases.
            logits = model(
                encoder_outputs=encoder, attention_mask=mask, decoder_input_ids=decoded
            ).logits[:, -1]
            token = logits.argmax(-1)
            out[:, step] = torch.where(done, pad, token)
            done |= token == eos
            if bool(done.all()):
                break
            decoded = torch.cat([decoded, token[:, None]], dim=1)
    else:
        # transformers 5.x renames ``past_key_values`` to ``cache`` (the old name warns).
        params = inspect.signature(model.forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"
        result = model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True
        )
        for step in range(max_new_tokens):
            token = result.logits[:, -1].argmax(-1)
            out[:, step] = torch.where(done, pad, token)
            done |= token == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            result = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{cache_arg: result[cache_arg]},
            )
    return [row[: row.index(eos)] if eos in row else row for row in out.tolist()]
