"""The decode loop: one running batch over a Hugging Face model with a slot KV cache.

``DecodeLoop`` is synchronous and owns the model; the engine's worker thread drives it (and
tests drive it step by step). Each call to ``admit`` prefills newly admitted rows as one group
(``prefill.Prefiller``) and writes them into free slots of the running batch
(``running.RunningBatch``, over ``kv_cache.SlotKV``); each call to ``step`` feeds every running
row its last token and chooses the next one. Rows that finish leave at once.

Finish reasons follow OpenAI: EOS and stop strings both end with ``"stop"``, the token limit
with ``"length"``, a closed stream or an aborted engine with ``"cancelled"``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from prompts.backbone import Backbone
from service.engine.base import FinishReason, GenerationResult, StreamDelta
from service.engine.detok import IncrementalDetokenizer
from service.engine.forward import Forward
from service.engine.forwards import choose_forward
from service.engine.prefill import Prefiller
from service.engine.prefix_cache import PrefixCache
from service.engine.rows import LoopStats, Row
from service.engine.running import RunningBatch
from service.engine.sampling import (
    BAD_ROW,
    NonFiniteLogitsError,
    choose_tokens,
    make_generator,
)

__all__ = ["DecodeLoop", "LoopStats", "Row"]

log = logging.getLogger("rankone.engine")


class DecodeLoop:
    """A running batch over one backbone. Not thread-safe: one thread calls it."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        prefix_cache: PrefixCache | None = None,
        seed: int = 0,
        max_rows: int = 0,
        forward: Forward | None = None,
    ) -> None:
        """``max_rows``: cache slots to allocate up front (the engine's max batch size);
        ``forward``: what runs the backbone (default: ``forwards.choose_forward``'s choice)."""
        self.backbone = backbone
        self.tokenizer = backbone.tokenizer
        self.seq2seq = backbone.is_seq2seq
        self.device = backbone.device
        self.stats = LoopStats()
        self.forward = forward if forward is not None else choose_forward(backbone)
        self.prefill = Prefiller(backbone, prefix_cache, self.stats, self.forward)
        self.prefix_cache = self.prefill.prefix_cache
        self.batch = RunningBatch(backbone, self.forward, max_rows=max_rows)
        # Copies of the backbone's facts: a bench or a test may run rows to their limit.
        self.eos_ids: set[int] = set(backbone.eos_ids)
        self.special_ids = frozenset(int(i) for i in self.tokenizer.all_special_ids)
        self.max_positions = backbone.max_positions
        self.rng = torch.Generator().manual_seed(seed)

    @property
    def rows(self) -> list[Row]:
        return self.batch.rows

    @property
    def running(self) -> int:
        return len(self.batch)

    @property
    def running_tokens(self) -> int:
        return sum(row.cost for row in self.batch.rows)

    # -- admission -------------------------------------------------------------------------

    def prepare(self) -> None:
        """What the forward and the prefill do once before serving (a compile, timings): the
        engine's model thread calls it first, so that no request waits for it."""
        self.forward.prepare()
        self.prefill.prepare()

    @torch.inference_mode()
    def admit(self, rows: Sequence[Row]) -> None:
        """Prefill ``rows`` (in groups of like lengths: ``Prefiller.groups``), choose their
        first tokens, add them to the batch."""
        rows = [r for r in rows if not self._finish_early(r)]
        if not rows:
            return
        for row in rows:
            row.detok = IncrementalDetokenizer(
                self.tokenizer, row.request.params.stop, self.special_ids
            )
            if not row.request.params.greedy:
                row.generator = make_generator(row.request.params.seed, self.device, self.rng)
        for group in self.prefill.groups(rows):
            self._admit_group(group)

    def _admit_group(self, rows: list[Row]) -> None:
        """Prefill ``rows`` as one group (one forward) and add them to the batch."""
        start = time.perf_counter()
        try:
            prefill = self.prefill(rows)
        except Exception as exc:  # the group ends alone; the running batch is untouched
            log.exception("prefill failed for a group of %d", len(rows))
            for row in rows:
                self._fail(row, exc)
            return
        self.stats.prefill_s += time.perf_counter() - start
        self.stats.prefills += 1
        first_row = len(self.batch)
        self.batch.admit(rows, prefill)
        self._choose_and_advance(prefill.logits, first_row)

    def _finish_early(self, row: Row) -> bool:
        if row.cancelled:
            self._finish(row, "cancelled", "", [])
            return True
        row.limit = row.request.params.max_new_tokens
        used = int(row.request.task.prompt.shape[0]) + len(row.request.input_ids)
        if used == 0:  # no prompt rows (the base model) and no input: nothing to continue
            self._fail(row, ValueError("a request without prompt rows needs input tokens"))
            return True
        if self.max_positions is not None:
            # Absolute-position models cannot go past their table. The last generated token
            # is never fed back, so L + T + n - 1 positions serve n new tokens. The handler
            # refuses what cannot fit (422); this guards direct callers of the engine.
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

    # -- decoding --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> int:
        """One decode step for every running row; returns how many rows took part."""
        self.drop_cancelled()
        if not self.batch.rows:
            return 0
        start = time.perf_counter()
        n = len(self.batch)
        self._choose_and_advance(self.batch.step(), first_row=0)
        self.stats.decode_s += time.perf_counter() - start
        self.stats.decode_steps += 1
        return n

    def _choose_and_advance(self, logits: Tensor, first_row: int) -> None:
        """Choose tokens for rows ``first_row ..`` from ``logits`` [n, V]; retire finished rows."""
        rows = self.batch.rows[first_row:]
        empty = self.batch.last[:0]
        seen = [
            torch.tensor(r.request.input_ids + r.generated, dtype=torch.long, device=self.device)
            if r.request.params.repetition_penalty != 1.0
            else empty
            for r in rows
        ]
        tokens = choose_tokens(
            logits, [r.request.params for r in rows], seen, [r.generator for r in rows]
        )
        self.batch.set_last(first_row, tokens)
        for row, token in zip(rows, tokens, strict=True):
            self._advance(row, token)
        self.batch.retire()

    def _advance(self, row: Row, token: int) -> None:
        assert row.detok is not None
        if token == BAD_ROW:
            self._fail(row, NonFiniteLogitsError(row.request.task.name))
            return
        if token in self.eos_ids and not row.request.params.ignore_eos:
            self._finish(row, "stop", row.detok.flush(), [])
            return
        row.generated.append(token)
        self.stats.generated += 1
        text = row.detok.add(token)
        if row.detok.stopped:
            self._finish(row, "stop", text, [token])
        elif len(row.generated) >= row.limit:
            self._finish(row, "length", text + row.detok.flush(), [token])
        elif row.streaming:
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
        row.failed = True
        row.fail(exc)

    def drop_cancelled(self) -> None:
        """Free the rows whose consumers went away (finish reason ``cancelled``)."""
        for row in self.batch.rows:
            if row.cancelled and not row.finished:
                self._finish(row, "cancelled", "", [])
        self.batch.retire()

    def abort(self, exc: BaseException | None = None) -> None:
        """End every running row: with ``exc`` (an internal error) or as cancelled."""
        for row in self.batch.rows:
            if not row.finished:
                if exc is None:
                    self._finish(row, "cancelled", "", [])
                else:
                    self._fail(row, exc)
        # After an error the buffers may hold anything (a half-written step): start afresh.
        self.batch.release()
