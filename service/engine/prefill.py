"""Prefill of newly admitted rows, as one group, apart from the running batch.

The group's forward runs on its own (a fresh ``DynamicCache`` over the new rows only), so its
cost depends on the new rows alone; ``RunningBatch.admit`` then writes the result into free
cache slots. Three paths:

- seq2seq: the encoder over right-padded ``[P; x]``, then the first decoder step;
- decoder-only without prefix cache: one forward over left-padded ``[pads; P; x]``;
- decoder-only with prefix cache: each task prompt's KV comes from ``PrefixCache`` (computed
  once per task version) and only the input tokens are prefilled, at positions ``L, L+1, ..``;
  where the input starts with the first ``j`` tokens of the task's latest input (a chat
  template's system turn), their columns come from the cache too and the prefill starts at
  ``L + j``.

Decoder-only forwards run ``fused_llama.FusedLlama`` where it covers the backbone, else the HF
forward with a fresh ``DynamicCache``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, EncoderDecoderCache

from prompts.backbone import Backbone
from prompts.compose import compose_prompts
from prompts.inputs import position_ids_from_mask
from service.engine.base import ResolvedTask
from service.engine.fused_llama import FusedLlama
from service.engine.kv_layout import (
    KV,
    decode_positions,
    left_pad,
    pad_sequences,
    prefill_positions,
)
from service.engine.prefix_cache import PrefixCache, PromptPrefix
from service.engine.rows import LoopStats, Row


@dataclass
class Prefill:
    """What a group's prefill hands to the running batch (b new rows)."""

    logits: Tensor  # [b, V] next-token logits
    layers: list[KV]  # per layer [b, H, T, Dh], left-padded
    mask: Tensor  # [b, T] 1 = real position
    positions: Tensor | None = None  # [b] next position id (decoder-only)
    cross: list[KV] | None = None  # seq2seq: per layer [b, H, S, Dh]
    enc_states: Tensor | None = None  # seq2seq: [b, S, d]
    enc_mask: Tensor | None = None  # seq2seq: [b, S]


def cache_layers(cache: Any) -> list[KV]:
    """A ``DynamicCache``'s per-layer (keys, values)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def compose_rows(tasks: Sequence[ResolvedTask]) -> list[Tensor]:
    """Each task's composed prompt [L_t, d], computed in one ``compose_prompts`` op per shape.

    Rows are grouped by (L, r) (one group in the common case); within a group the distinct
    shared prompts are stacked [S, L, d] and indexed per row.
    """
    out: list[Tensor | None] = [None] * len(tasks)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault((int(task.prompt.shape[0]), int(task.u.shape[1])), []).append(i)
    for members in groups.values():
        shared_ids: dict[str, int] = {}
        shared: list[Tensor] = []
        index: list[int] = []
        for i in members:
            task = tasks[i]
            if task.shared_id not in shared_ids:
                shared_ids[task.shared_id] = len(shared)
                shared.append(task.prompt)
            index.append(shared_ids[task.shared_id])
        device = shared[0].device
        prompts = compose_prompts(
            torch.stack(shared),  # [S, L, d]
            torch.tensor(index, dtype=torch.long, device=device),  # [B]
            torch.stack([tasks[i].u for i in members]),  # [B, L, r]
            torch.stack([tasks[i].v for i in members]),  # [B, r, d]
        )  # [B, L, d]
        for j, i in enumerate(members):
            out[i] = prompts[j]
    return [p for p in out if p is not None]


class Prefiller:
    """Runs a group's prefill over the backbone (one thread: the model's)."""

    def __init__(
        self,
        backbone: Backbone,
        prefix_cache: PrefixCache | None,
        stats: LoopStats,
        fused: FusedLlama | None = None,
    ) -> None:
        """``fused``: the forward to run where it covers the model (else the HF forward)."""
        self.backbone = backbone
        self.fused = fused
        self.model: Any = backbone.model
        self.device = backbone.device
        self.dtype = backbone.dtype
        self.seq2seq = backbone.is_seq2seq
        # Seq2seq encoders are bidirectional: a prompt's states depend on the input.
        self.prefix_cache = None if self.seq2seq else prefix_cache
        self.stats = stats

    def __call__(self, rows: Sequence[Row]) -> Prefill:
        if self.seq2seq:
            return self._seq2seq(rows)
        if self.prefix_cache is not None:
            return self._cached(rows)
        return self._causal(rows)

    def _compose(self, tasks: Sequence[ResolvedTask]) -> list[Tensor]:
        start = time.perf_counter()
        prompts = [p.to(self.dtype) for p in compose_rows(tasks)]
        self.stats.compose_s += time.perf_counter() - start
        return prompts

    def _embed_rows(self, rows: Sequence[Row], prompts: Sequence[Tensor]) -> list[Tensor]:
        """Per row ``[P; x]`` embeddings [L + T, d]."""
        out = []
        for row, prompt in zip(rows, prompts, strict=True):
            ids = torch.tensor(row.request.input_ids, dtype=torch.long, device=self.device)
            out.append(torch.cat([prompt, self.backbone.embed(ids[None])[0].to(self.dtype)]))
        return out

    def _forward(
        self,
        mask: Tensor,
        positions: Tensor,
        *,
        embeds: Tensor | None = None,
        ids: Tensor | None = None,
        past: list[KV] | None = None,
    ) -> tuple[Tensor, list[KV]]:
        """A decoder-only forward over ``embeds`` [B, T, d] or ``ids`` [B, T] after ``past``
        (per layer [B, H, P, Dh]), ``mask`` [B, P + T]: last logits [B, V], per-layer KV."""
        if self.fused is not None:
            x = embeds if embeds is not None else self.fused.embed(ids)
            return self.fused.prefill(x, positions, mask, past)
        cache = DynamicCache(past) if past is not None else DynamicCache()
        out = self.model(
            input_ids=ids,
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1], cache_layers(cache)

    def _seq2seq(self, rows: Sequence[Row]) -> Prefill:
        prompts = self._compose([r.request.task for r in rows])
        embeds, enc_mask = pad_sequences(self._embed_rows(rows, prompts), side="right")  # [B, S, d]
        encoder = self.model.get_encoder()
        enc_states = encoder(inputs_embeds=embeds, attention_mask=enc_mask).last_hidden_state
        start_id = self.model.config.decoder_start_token_id
        first = torch.full((len(rows), 1), int(start_id), dtype=torch.long, device=self.device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = self.model(
            encoder_outputs=(enc_states,),
            attention_mask=enc_mask,
            decoder_input_ids=first,
            cache=cache,
            use_cache=True,
        )
        return Prefill(
            logits=out.logits[:, -1],
            layers=cache_layers(cache.self_attention_cache),
            mask=torch.ones(len(rows), 1, dtype=torch.long, device=self.device),
            cross=cache_layers(cache.cross_attention_cache),
            enc_states=enc_states,
            enc_mask=enc_mask,
        )

    def _causal(self, rows: Sequence[Row]) -> Prefill:
        """No prefix cache: one forward over left-padded ``[pads; P; x]`` (the reference layout)."""
        prompts = self._compose([r.request.task for r in rows])
        embeds, mask = pad_sequences(self._embed_rows(rows, prompts), side="left")  # [B, N, d]
        logits, layers = self._forward(mask, position_ids_from_mask(mask), embeds=embeds)
        return Prefill(logits, layers, mask, decode_positions(mask))

    def _compute_prefixes(
        self, tasks: Sequence[ResolvedTask], prompts: Sequence[Tensor]
    ) -> list[PromptPrefix]:
        """The prompts' KV, one forward per prompt length, each put in the cache.

        ``prompts``: per task [L, d]. Tasks of one length share a forward over [m, L, d]: a
        burst of new tasks costs a few large GEMMs, not one small forward per task.
        """
        assert self.prefix_cache is not None
        out: list[PromptPrefix | None] = [None] * len(tasks)
        groups: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(int(prompt.shape[0]), []).append(i)
        for length, members in groups.items():
            m = len(members)
            logits, layers = self._forward(
                torch.ones(m, length, dtype=torch.long, device=self.device),
                torch.arange(length, device=self.device)[None].expand(m, length),
                embeds=torch.stack([prompts[i] for i in members]),  # [m, L, d]
            )  # logits [m, V]
            for j, i in enumerate(members):
                # Clones: a cached prefix must not keep its whole group's tensors alive.
                prefix = PromptPrefix(
                    tuple((k[j : j + 1].clone(), v[j : j + 1].clone()) for k, v in layers),
                    logits[j].clone(),
                )
                self.prefix_cache.put(tasks[i].name, tasks[i].version, prefix)
                out[i] = prefix
        return [p for p in out if p is not None]

    def _prefixes(self, tasks: Sequence[ResolvedTask]) -> list[PromptPrefix]:
        """Each task's prompt prefix: one cache lookup per distinct (task, version)."""
        assert self.prefix_cache is not None
        # We keep our own refs, so a prefix evicted (tiny budget) by a later put is still used
        # here rather than recomputed.
        found: dict[tuple[str, int], PromptPrefix] = {}
        missing: dict[tuple[str, int], ResolvedTask] = {}
        for task in tasks:
            key = (task.name, task.version)
            if key in found or key in missing:
                continue
            if task.prompt.shape[0] == 0:  # the base model: no prompt rows, nothing to cache
                found[key] = NO_PREFIX
                continue
            cached = self.prefix_cache.get(task.name, task.version)
            if cached is None:
                missing[key] = task
            else:
                found[key] = cached
        if missing:
            new = list(missing.values())
            computed = self._compute_prefixes(new, self._compose(new))
            found.update(zip(missing, computed, strict=True))
        return [found[(t.name, t.version)] for t in tasks]

    def _cached(self, rows: Sequence[Row]) -> Prefill:
        """Reuse each task's prompt KV, and the first tokens of its latest input where the new
        input starts with them; prefill only the rest of the input, after them."""
        assert self.prefix_cache is not None
        tasks = [r.request.task for r in rows]
        prompts = self._prefixes(tasks)
        inputs = [list(r.request.input_ids) for r in rows]
        pasts: list[tuple[KV, ...]] = []  # per row: per layer [1, H, P_b, Dh]
        skip: list[int] = []  # per row: input tokens already in its past
        for task, prompt, x in zip(tasks, prompts, inputs, strict=True):
            latest = self.prefix_cache.get_input(task.name, task.version)
            j = 0
            if latest is not None and latest.length - len(latest.tokens) == prompt.length:
                j = common_prefix(latest.tokens, x, limit=len(x) - 1)  # >= 1 token to prefill
            if j > 0:
                cols = prompt.length + j
                pasts.append(tuple((k[:, :, :cols], v[:, :, :cols]) for k, v in latest.layers))
            else:
                pasts.append(prompt.layers)
            skip.append(j)
        past_lengths = [int(p[0][0].shape[2]) if p else 0 for p in pasts]
        longest = max(past_lengths)
        layers = stack_pasts(pasts, longest)  # per layer [B, H, Pmax, Dh]; None: no past at all
        prefix_mask, _ = pad_sequences(
            [torch.ones(n, dtype=torch.long, device=self.device) for n in past_lengths],
            side="left",
            length=longest,
        )  # [B, Pmax]
        lengths = torch.tensor(past_lengths, device=self.device)  # [B]
        ids = [
            torch.tensor(x[j:], dtype=torch.long, device=self.device)
            for x, j in zip(inputs, skip, strict=True)
        ]
        input_ids, input_mask = pad_sequences(ids, side="left")  # [B, T]
        empty = [len(x) == 0 for x in inputs]
        if any(e and p.length == 0 for e, p in zip(empty, prompts, strict=True)):
            raise ValueError(
                "a row with no prompt rows and no input tokens has nothing to continue"
            )
        last_logits = None
        if any(empty):
            last_logits = torch.stack([p.last_logits for p in prompts])  # [B, V]
        if input_ids.shape[1] == 0:
            assert last_logits is not None and layers is not None
            return Prefill(last_logits, layers, prefix_mask, decode_positions(prefix_mask))
        mask = torch.cat([prefix_mask, input_mask], dim=1)  # [B, Pmax + T]
        logits, layers = self._forward(
            mask, prefill_positions(lengths, input_mask), ids=input_ids, past=layers
        )
        if last_logits is not None:
            rows_empty = torch.tensor(empty, device=self.device)  # [B]
            logits = torch.where(rows_empty[:, None], last_logits.to(logits.dtype), logits)
        self.stats.input_tokens_reused += sum(skip)
        self._keep_inputs(tasks, inputs, layers, mask)
        return Prefill(logits, layers, mask, decode_positions(mask))

    def _keep_inputs(
        self,
        tasks: Sequence[ResolvedTask],
        inputs: Sequence[list[int]],
        layers: list[KV],
        mask: Tensor,
    ) -> None:
        """Each task's prompt + its latest input, for the next request that starts alike."""
        assert self.prefix_cache is not None
        for b, (task, x) in enumerate(zip(tasks, inputs, strict=True)):
            if not x:
                continue
            real = mask[b].nonzero().squeeze(1)  # the row's columns: prompt, then input
            kept = tuple(
                (k[b : b + 1].index_select(2, real), v[b : b + 1].index_select(2, real))
                for k, v in layers
            )
            prefix = PromptPrefix(kept, layers[0][0].new_zeros(0), tokens=tuple(x))
            self.prefix_cache.put_input(task.name, task.version, prefix)


# A zero-row prompt's prefix (the base model): no columns, never cached.
NO_PREFIX = PromptPrefix((), torch.zeros(0))


def stack_pasts(pasts: Sequence[tuple[KV, ...]], longest: int) -> list[KV] | None:
    """Per-row pasts (per layer [1, H, P_b, Dh]; ``()`` for a row with none) left-padded to
    ``longest`` and stacked: per layer [B, H, longest, Dh]. None when no row has a past."""
    template = next((p for p in pasts if p), None)
    if template is None:
        return None
    none = tuple((k[:, :, :0], v[:, :, :0]) for k, v in template)  # [1, H, 0, Dh]
    full = [p or none for p in pasts]
    return [
        (
            torch.cat([left_pad(p[i][0], longest, 2) for p in full]),
            torch.cat([left_pad(p[i][1], longest, 2) for p in full]),
        )
        for i in range(len(template))
    ]


def common_prefix(a: Sequence[int], b: Sequence[int], *, limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit`` (0 if negative)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if n >= limit or x != y:
            break
        n += 1
    return n
