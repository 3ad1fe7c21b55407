"""The decode loop: one running batch over a Hugging Face model with a KV cache.

``DecodeLoop`` is synchronous and owns the model; the engine's worker thread drives it (and
tests drive it step by step). Each call to ``admit`` prefills newly admitted rows as one group
and merges them into the running batch; each call to ``step`` feeds every running row its last
token and chooses the next one. Rows that finish leave at once.

Layout of the running batch (B rows):
- ``self_layers`` per layer keys/values ``[B, H, T, Dh]``, left-padded, mask ``[B, T]``;
- decoder-only: ``positions`` ``[B]``, the next position id of each row (prompt rows count);
- seq2seq: the encoder states ``[B, S, d]`` with mask ``[B, S]`` and the cross-attention
  keys/values ``[B, H, S, Dh]`` (computed once per row, at its first decoder step).

Finish reasons follow OpenAI: EOS and stop strings both end with ``"stop"``, the token limit
with ``"length"``, a closed stream or an aborted engine with ``"cancelled"``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, EncoderDecoderCache

from prompts.backbone import Backbone
from prompts.compose import compose_prompts
from prompts.inputs import position_ids_from_mask
from service.engine.base import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    ResolvedTask,
    StreamDelta,
)
from service.engine.detok import IncrementalDetokenizer
from service.engine.kv_layout import (
    KV,
    decode_positions,
    leading_pad_columns,
    left_pad,
    merge_layers,
    merge_masks,
    pad_sequences,
    prefill_positions,
    select_layers,
)
from service.engine.prefix_cache import PrefixCache, PromptPrefix
from service.engine.sampling import (
    BAD_ROW,
    NonFiniteLogitsError,
    choose_tokens,
    make_generator,
)

log = logging.getLogger("rankone.engine")


@dataclass(eq=False)
class Row:
    """One request in flight. ``emit`` receives its deltas (the last one carries the result)."""

    request: GenerationRequest
    emit: Callable[[StreamDelta], None]
    fail: Callable[[BaseException], None] = lambda exc: None
    cancelled: bool = False  # set from any thread; honoured at the next step boundary
    generated: list[int] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    generator: torch.Generator | None = None
    finished: bool = False
    limit: int = 0  # new tokens allowed: max_new_tokens, or fewer where positions run out

    @property
    def cost(self) -> int:
        """Token budget: prompt rows + input tokens + max new tokens."""
        task = self.request.task
        return (
            int(task.prompt.shape[0])
            + len(self.request.input_ids)
            + self.request.params.max_new_tokens
        )

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class LoopStats:
    """Wall-clock seconds spent by phase (bench figures; no device sync is forced)."""

    compose_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    prefills: int = 0
    generated: int = 0


# Cache layers are handled as ``Any``: the engine only builds plain ``DynamicLayer``s (full
# attention), whose ``keys``/``values`` are [B, H, T, Dh] tensors.


def _dynamic_cache(layers: Sequence[KV]) -> DynamicCache:
    """A ``DynamicCache`` holding exactly these per-layer tensors (no copy)."""
    cache = DynamicCache([(k[:, :, :0], v[:, :, :0]) for k, v in layers])
    _set_layers(cache, layers)
    return cache


def _layers(cache: Any) -> list[KV]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _set_layers(cache: Any, layers: Sequence[KV]) -> None:
    for layer, (k, v) in zip(cache.layers, layers, strict=True):
        layer.keys, layer.values = k, v


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


class DecodeLoop:
    """A running batch over one backbone. Not thread-safe: one thread calls it."""

    def __init__(
        self, backbone: Backbone, *, prefix_cache: PrefixCache | None = None, seed: int = 0
    ) -> None:
        self.backbone = backbone
        self.model: Any = backbone.model
        self.tokenizer = backbone.tokenizer
        self.seq2seq = backbone.is_seq2seq
        self.device = backbone.device
        self.dtype = backbone.dtype
        # Seq2seq encoders are bidirectional: a prompt's states depend on the input.
        self.prefix_cache = None if self.seq2seq else prefix_cache
        self.eos_ids = self._eos_ids()
        self.special_ids = frozenset(int(i) for i in self.tokenizer.all_special_ids)
        self.max_positions = None if self.seq2seq else self._max_positions()
        self.rng = torch.Generator().manual_seed(seed)
        self.stats = LoopStats()
        self.rows: list[Row] = []
        self._reset()

    # -- state -----------------------------------------------------------------------------

    def _reset(self) -> None:
        self.cache: DynamicCache | EncoderDecoderCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, T]
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # [B] token to feed
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # [B] causal only
        self.enc_states: Tensor | None = None  # [B, S, d] seq2seq only
        self.enc_mask: Tensor | None = None  # [B, S]

    def _max_positions(self) -> int | None:
        config = self.model.config
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config):
            eos = getattr(source, "eos_token_id", None)
            if eos is None:
                continue
            ids.update([eos] if isinstance(eos, int) else list(eos))
        if not ids and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def running_tokens(self) -> int:
        return sum(row.cost for row in self.rows)

    # -- admission -------------------------------------------------------------------------

    @torch.inference_mode()
    def admit(self, rows: Sequence[Row]) -> None:
        """Prefill ``rows`` as one group, choose their first tokens, merge them into the batch."""
        rows = [r for r in rows if not self._finish_early(r)]
        if not rows:
            return
        for row in rows:
            row.detok = IncrementalDetokenizer(
                self.tokenizer, row.request.params.stop, self.special_ids
            )
            if not row.request.params.greedy:
                row.generator = make_generator(row.request.params.seed, self.device, self.rng)
        start = time.perf_counter()
        try:
            logits, state = self._prefill(rows)
        except Exception as exc:  # the group ends alone; the running batch is untouched
            log.exception("prefill failed for a group of %d", len(rows))
            for row in rows:
                self._fail(row, exc)
            return
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.prefills += 1
        self._merge(rows, state)
        self._choose_and_advance(logits, first_row=len(self.rows) - len(rows))

    def _prefill(self, rows: Sequence[Row]) -> tuple[Tensor, dict[str, object]]:
        if self.seq2seq:
            return self._prefill_seq2seq(rows)
        if self.prefix_cache is not None:
            return self._prefill_cached(rows)
        return self._prefill_causal(rows)

    def _finish_early(self, row: Row) -> bool:
        if row.cancelled:
            self._finish(row, "cancelled", "", [])
            return True
        row.limit = row.request.params.max_new_tokens
        if self.max_positions is not None:
            # Absolute-position models cannot go past their table. The last generated token
            # is never fed back, so L + T + n - 1 positions serve n new tokens. The handler
            # refuses what cannot fit (422); this guards direct callers of the engine.
            used = int(row.request.task.prompt.shape[0]) + len(row.request.input_ids)
            if used > self.max_positions:
                self._fail(
                    row,
                    ValueError(
                        f"prompt ({used - len(row.request.input_ids)} rows) + input "
                        f"({len(row.request.input_ids)} tokens) exceed the model's "
                        f"{self.max_positions} positions; shorten the input"
                    ),
                )
                return True
            row.limit = min(row.limit, self.max_positions - used + 1)
        if row.limit <= 0:
            row.detok = IncrementalDetokenizer(self.tokenizer)
            self._finish(row, "length", "", [])
            return True
        return False

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

    def _prefill_seq2seq(self, rows: Sequence[Row]) -> tuple[Tensor, dict[str, object]]:
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
        state = {
            "self": _layers(cache.self_attention_cache),
            "cross": _layers(cache.cross_attention_cache),
            "mask": torch.ones(len(rows), 1, dtype=torch.long, device=self.device),
            "enc_states": enc_states,
            "enc_mask": enc_mask,
        }
        return out.logits[:, -1], state

    def _prefill_causal(self, rows: Sequence[Row]) -> tuple[Tensor, dict[str, object]]:
        """No prefix cache: one forward over left-padded ``[pads; P; x]`` (the reference layout)."""
        prompts = self._compose([r.request.task for r in rows])
        embeds, mask = pad_sequences(self._embed_rows(rows, prompts), side="left")  # [B, N, d]
        cache = DynamicCache()
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1], {"self": _layers(cache), "mask": mask}

    def _prefix(self, task: ResolvedTask, prompt: Tensor) -> PromptPrefix:
        """Compute the task prompt's KV from ``prompt`` [L, d] and put it in the cache."""
        assert self.prefix_cache is not None
        length = prompt.shape[0]
        cache = DynamicCache()
        out = self.model(
            inputs_embeds=prompt[None],
            attention_mask=torch.ones(1, length, dtype=torch.long, device=self.device),
            position_ids=torch.arange(length, device=self.device)[None],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        prefix = PromptPrefix(tuple(_layers(cache)), out.logits[0, -1])
        self.prefix_cache.put(task.name, task.version, prefix)
        return prefix

    def _prefill_cached(self, rows: Sequence[Row]) -> tuple[Tensor, dict[str, object]]:
        """Reuse each task's prompt KV; prefill only the inputs, at positions L, L+1, ..."""
        assert self.prefix_cache is not None
        tasks = [r.request.task for r in rows]
        # One cache lookup per distinct (task, version). We keep our own refs, so a prefix
        # evicted (tiny budget) by a later put is still used here rather than recomputed.
        found: dict[tuple[str, int], PromptPrefix] = {}
        missing: dict[tuple[str, int], ResolvedTask] = {}
        for task in tasks:
            key = (task.name, task.version)
            if key in found or key in missing:
                continue
            cached = self.prefix_cache.get(task.name, task.version)
            if cached is None:
                missing[key] = task
            else:
                found[key] = cached
        if missing:
            prompts = self._compose(list(missing.values()))
            for (key, task), prompt in zip(missing.items(), prompts, strict=True):
                found[key] = self._prefix(task, prompt)
        prefixes = [found[(t.name, t.version)] for t in tasks]
        longest = max(p.length for p in prefixes)
        n_layers = len(prefixes[0].layers)
        layers: list[KV] = [
            (
                torch.cat([left_pad(p.layers[i][0], longest, 2) for p in prefixes]),
                torch.cat([left_pad(p.layers[i][1], longest, 2) for p in prefixes]),
            )
            for i in range(n_layers)
        ]  # per layer [B, H, Lmax, Dh]
        prefix_mask, _ = pad_sequences(
            [torch.ones(p.length, dtype=torch.long, device=self.device) for p in prefixes],
            side="left",
            length=longest,
        )  # [B, Lmax]
        lengths = torch.tensor([p.length for p in prefixes], device=self.device)  # [B]
        ids = [
            torch.tensor(r.request.input_ids, dtype=torch.long, device=self.device) for r in rows
        ]
        input_ids, input_mask = pad_sequences(ids, side="left")  # [B, T]
        last_logits = torch.stack([p.last_logits for p in prefixes])  # [B, V]
        if input_ids.shape[1] == 0:
            return last_logits, {"self": layers, "mask": prefix_mask}
        cache = _dynamic_cache(layers)
        mask = torch.cat([prefix_mask, input_mask], dim=1)  # [B, Lmax + T]
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=prefill_positions(lengths, input_mask),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1]
        empty = torch.tensor([len(i) == 0 for i in ids], device=self.device)
        logits = torch.where(empty[:, None], last_logits.to(logits.dtype), logits)
        return logits, {"self": _layers(cache), "mask": mask}

    def _merge(self, rows: Sequence[Row], state: dict[str, object]) -> None:
        new_self: list[KV] = state["self"]  # type: ignore[assignment]
        new_mask: Tensor = state["mask"]  # type: ignore[assignment]
        count = len(rows)
        placeholder = torch.zeros(count, dtype=torch.long, device=self.device)
        if self.cache is None:
            self_layers = new_self
            self.mask = new_mask
        else:
            self_layers = merge_layers(self._self_layers(), new_self)
            self.mask = merge_masks(self.mask, new_mask)
        self.last = torch.cat([self.last, placeholder])
        if self.seq2seq:
            new_cross: list[KV] = state["cross"]  # type: ignore[assignment]
            enc_states: Tensor = state["enc_states"]  # type: ignore[assignment]
            enc_mask: Tensor = state["enc_mask"]  # type: ignore[assignment]
            if self.cache is None or self.enc_states is None or self.enc_mask is None:
                cross_layers = new_cross
                self.enc_states, self.enc_mask = enc_states, enc_mask
            else:
                assert isinstance(self.cache, EncoderDecoderCache)
                cross_layers = merge_layers(_layers(self.cache.cross_attention_cache), new_cross)
                width = max(self.enc_states.shape[1], enc_states.shape[1])
                self.enc_states = torch.cat(
                    [left_pad(self.enc_states, width, 1), left_pad(enc_states, width, 1)]
                )
                self.enc_mask = merge_masks(self.enc_mask, enc_mask)
            self.cache = EncoderDecoderCache(
                _dynamic_cache(self_layers), _dynamic_cache(cross_layers)
            )
        else:
            self.cache = _dynamic_cache(self_layers)
            self.positions = torch.cat([self.positions, decode_positions(new_mask)])
        self.rows.extend(rows)

    def _self_layers(self) -> list[KV]:
        assert self.cache is not None
        if isinstance(self.cache, EncoderDecoderCache):
            return _layers(self.cache.self_attention_cache)
        return _layers(self.cache)

    # -- decoding --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> int:
        """One decode step for every running row; returns how many rows took part."""
        self.drop_cancelled()
        if not self.rows:
            return 0
        start = time.perf_counter()
        batch = len(self.rows)
        ones = torch.ones(batch, 1, dtype=torch.long, device=self.device)
        mask = torch.cat([self.mask, ones], dim=1)  # [B, T + 1]
        if self.seq2seq:
            out = self.model(
                encoder_outputs=(self.enc_states,),
                attention_mask=self.enc_mask,
                decoder_input_ids=self.last[:, None],
                decoder_attention_mask=mask,
                cache=self.cache,
                use_cache=True,
            )
        else:
            out = self.model(
                input_ids=self.last[:, None],
                attention_mask=mask,
                position_ids=self.positions[:, None],
                cache=self.cache,
                use_cache=True,
            )
            self.positions = self.positions + 1
        self.mask = mask
        self._choose_and_advance(out.logits[:, -1], first_row=0)
        self.stats.decode_s += time.perf_counter() - start
        self.stats.decode_steps += 1
        return batch

    def _choose_and_advance(self, logits: Tensor, first_row: int) -> None:
        """Choose tokens for rows ``first_row ..`` from ``logits`` [n, V]; retire finished rows."""
        rows = self.rows[first_row:]
        seen = [
            torch.tensor(r.request.input_ids + r.generated, dtype=torch.long, device=self.device)
            if r.request.params.repetition_penalty != 1.0
            else self.last[:0]
            for r in rows
        ]
        tokens = choose_tokens(
            logits, [r.request.params for r in rows], seen, [r.generator for r in rows]
        )
        self.last[first_row:] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        for row, token in zip(rows, tokens, strict=True):
            self._advance(row, token)
        self._retire()

    def _advance(self, row: Row, token: int) -> None:
        assert row.detok is not None
        if token == BAD_ROW:
            self._fail(row, NonFiniteLogitsError(row.request.task.name))
            return
        if token in self.eos_ids:
            self._finish(row, "stop", row.detok.flush(), [])
            return
        row.generated.append(token)
        self.stats.generated += 1
        text = row.detok.add(token)
        if row.detok.stopped:
            self._finish(row, "stop", text, [token])
        elif len(row.generated) >= row.limit:
            self._finish(row, "length", text + row.detok.flush(), [token])
        else:
            row.emit(StreamDelta(text=text, token_ids=[token]))

    def _finish(self, row: Row, reason: FinishReason, text: str, token_ids: list[int]) -> None:
        row.finished = True
        result = GenerationResult(
            text=row.detok.text if row.detok is not None else "",
            token_ids=list(row.generated),
            finish_reason=reason,
            prompt_tokens=len(row.request.input_ids),
            completion_tokens=len(row.generated),
        )
        row.emit(StreamDelta(text=text, token_ids=token_ids, result=result))

    def _fail(self, row: Row, exc: BaseException) -> None:
        """End one row with an error (its neighbours go on); it leaves at the next retire."""
        row.finished = True
        row.fail(exc)

    def drop_cancelled(self) -> None:
        """Free the rows whose consumers went away (finish reason ``cancelled``)."""
        for row in self.rows:
            if row.cancelled and not row.finished:
                self._finish(row, "cancelled", "", [])
        self._retire()

    def abort(self, exc: BaseException | None = None) -> None:
        """End every running row: with ``exc`` (an internal error) or as cancelled."""
        for row in self.rows:
            if not row.finished:
                if exc is None:
                    self._finish(row, "cancelled", "", [])
                else:
                    row.finished = True
                    row.fail(exc)
        self.rows = []
        self._reset()

    def _retire(self) -> None:
        """Remove finished rows from the batch and trim columns no remaining row uses."""
        keep_list = [i for i, row in enumerate(self.rows) if not row.finished]
        if len(keep_list) == len(self.rows):
            return
        if not keep_list:
            self.rows = []
            self._reset()
            return
        keep = torch.tensor(keep_list, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in keep_list]
        mask = self.mask[keep]
        drop = leading_pad_columns(mask)
        self.mask = mask[:, drop:]
        self.last = self.last[keep]
        if isinstance(self.cache, EncoderDecoderCache):
            _set_layers(
                self.cache.self_attention_cache,
                select_layers(_layers(self.cache.self_attention_cache), keep, drop),
            )
            assert self.enc_mask is not None and self.enc_states is not None
            enc_mask = self.enc_mask[keep]
            enc_drop = leading_pad_columns(enc_mask)
            self.enc_mask = enc_mask[:, enc_drop:]
            self.enc_states = self.enc_states[keep, enc_drop:]
            _set_layers(
                self.cache.cross_attention_cache,
                select_layers(_layers(self.cache.cross_attention_cache), keep, enc_drop),
            )
        elif self.cache is not None:
            _set_layers(self.cache, select_layers(_layers(self.cache), keep, drop))
            self.positions = self.positions[keep]
