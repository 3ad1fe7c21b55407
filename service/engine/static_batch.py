"""Pure helpers of the static engine: grouping, padding, prompt composition, trimming."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, EncoderDecoderCache, LogitsProcessorList

from prompts.backbone import Backbone
from prompts.inputs import prepend_prompts
from service.core.tasks import compose_tasks
from service.engine.base import FinishReason, GenerationRequest, GenerationResult, SamplingParams
from service.engine.sampling import NonFiniteLogitsError, unusable


def group_key(request: GenerationRequest) -> Hashable:
    """Requests with equal keys can share one ``generate`` call.

    Greedy rows share any group of their prompt length; sampled rows need identical
    parameters; a seeded row samples alone, since a seed governs the whole call's RNG.
    """
    p = request.params
    length = int(request.task.prompt.shape[0])
    if p.seed is not None and not p.greedy:
        return ("seeded", id(request))
    if p.greedy:
        return ("greedy", length, p.repetition_penalty, p.ignore_eos)
    return ("sampled", length, p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.ignore_eos)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token rows → ids [B, T] right-padded with ``pad_id`` and mask [B, T] (1 = token)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    return ids, mask


def batch_prompts(
    requests: Sequence[GenerationRequest], *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Every row's task prompt [B, L, d] (one ``group_key`` group shares L)."""
    prompts = compose_tasks([r.task for r in requests])  # each [L, d]
    return torch.stack(prompts).to(device=device, dtype=dtype)


def trim(
    tokens: list[int], params: SamplingParams, eos: set[int], decode: Callable[[list[int]], str]
) -> tuple[list[int], str, FinishReason]:
    """Cut a generated row at its own limit, its first EOS (unless it ignores EOS) and its
    first stop string."""
    tokens = tokens[: params.max_new_tokens]
    reason: FinishReason = "length"
    for i, t in enumerate(tokens):
        if t in eos and not params.ignore_eos:
            tokens, reason = tokens[:i], "stop"
            break
    text = decode(tokens)
    if params.stop:
        hits = [text.find(s) for s in params.stop if s in text]
        if hits:
            text, reason = text[: min(hits)], "stop"
            # The fewest tokens whose text reaches the stop string.
            for k in range(1, len(tokens) + 1):
                if any(s in decode(tokens[:k]) for s in params.stop):
                    tokens = tokens[:k]
                    break
    return tokens, text, reason


def generate_kwargs(params: SamplingParams) -> dict[str, Any]:
    if params.greedy:
        return {"do_sample": False, "repetition_penalty": params.repetition_penalty}
    return {
        "do_sample": True,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "repetition_penalty": params.repetition_penalty,
    }


class NonFiniteGuard:
    """A ``generate`` logits processor (run last, on the final scores) that isolates bad rows.

    A row whose scores are unusable (NaN, +inf, or all -inf) is recorded in ``bad`` and gets a
    one-hot score on ``stop_id`` instead, so the call neither raises in sampling nor keeps the
    row running; the caller ends those rows with ``NonFiniteLogitsError``.
    """

    def __init__(self, batch: int, stop_id: int) -> None:
        self.bad = [False] * batch
        self.stop_id = stop_id

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:  # scores [B, V]
        rows = unusable(scores)  # [B]
        if not bool(rows.any()):
            return scores
        for b in rows.nonzero().flatten().tolist():
            self.bad[b] = True
        stand_in = torch.full_like(scores[0], float("-inf"))
        stand_in[self.stop_id] = 0.0
        return torch.where(rows[:, None], stand_in, scores)


def run_group(
    backbone: Backbone, requests: list[GenerationRequest]
) -> list[GenerationResult | Exception]:
    """One ``generate`` call for requests sharing a ``group_key``; runs in the model thread.

    A row whose scores turn non-finite gets a ``NonFiniteLogitsError`` in its place; the other
    rows of the call are unaffected (nothing crosses rows in a forward pass).
    """
    tok = backbone.tokenizer
    device, dtype = backbone.device, backbone.dtype
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = set(backbone.eos_ids)
    params = requests[0].params
    guard = NonFiniteGuard(len(requests), min(eos) if eos else pad_id)
    extra: dict[str, Any] = {}
    if backbone.is_seq2seq:
        # generate's own cache assumes as many decoder as encoder layers (IndexError on a T5
        # with num_decoder_layers != num_layers); an empty cache of ours sizes itself.
        extra["cache"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.inference_mode():
        ids, mask = pad_right([r.input_ids for r in requests], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        prompts = batch_prompts(requests, device=device, dtype=dtype)  # [B, L, d]
        embeds = backbone.embed(ids)  # [B, T, d]
        inputs = prepend_prompts(embeds, mask, prompts, causal=not backbone.is_seq2seq)
        if params.seed is not None and not params.greedy:
            torch.manual_seed(params.seed)
        out = backbone.model.generate(  # type: ignore[operator]
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            max_new_tokens=max(r.params.max_new_tokens for r in requests),
            min_new_tokens=0,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=None if params.ignore_eos else (sorted(eos) or None),
            logits_processor=LogitsProcessorList([guard]),
            **generate_kwargs(params),
            **extra,
        )
    if backbone.is_seq2seq:
        out = out[:, 1:]  # drop the decoder start token
    results: list[GenerationResult | Exception] = []
    for b, r in enumerate(requests):
        if guard.bad[b]:
            results.append(NonFiniteLogitsError(r.task.name))
            continue
        tokens, text, reason = trim(
            out[b].tolist(), r.params, eos, lambda t: tok.decode(t, skip_special_tokens=True)
        )
        results.append(
            GenerationResult(
                text=text,
                token_ids=tokens,
                finish_reason=reason,
                prompt_tokens=len(r.input_ids),
                completion_tokens=len(tokens),
            )
        )
    return results
