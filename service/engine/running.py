"""The running batch: its rows, their slot KV cache, and the inputs of the next step.

Row ``i`` of ``rows`` lives in cache slot ``i`` (see ``kv_cache``). Per row, besides the cache:
``last`` [n] the token to feed next, and ``positions`` [n] its position id (decoder-only).
Seq2seq rows also carry their encoder states ``[n, S, d]`` + mask ``[n, S]`` and cross-attention
keys/values ``[n, H, S, Dh]``: those are written once, at the row's first decoder step, and never
grow, so a decode step never touches them; admission and retirement re-stack them (O(n · S)),
which happens per change of the batch, not per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from prompts.backbone import Backbone
from service.engine.forward import EncoderSide, Forward, StepInputs
from service.engine.kv_cache import SlotKV
from service.engine.kv_layout import leading_pad_columns, left_pad, merge_layers, merge_masks
from service.engine.prefill import Prefill
from service.engine.rows import Row


class RunningBatch:
    """Rows in flight and their decode state (one thread: the model's)."""

    def __init__(self, backbone: Backbone, forward: Forward, *, max_rows: int = 0) -> None:
        """``forward``: what runs each decode step (see ``forward.Forward``)."""
        self.forward = forward
        self.device = backbone.device
        self.dtype = backbone.dtype
        self.seq2seq = backbone.is_seq2seq
        self.kv = SlotKV(backbone.decoder_layers, self.device, self.dtype, min_rows=max_rows)
        self.rows: list[Row] = []
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # [n]
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # [n] decoder-only
        self.encoder: EncoderSide | None = None  # seq2seq: the rows' encoder side
        # Bool masks are what SDPA takes directly; other kernels add a float mask.
        config = getattr(backbone.model, "config", None)
        self.bool_mask = getattr(config, "_attn_implementation", "eager") == "sdpa"

    def __len__(self) -> int:
        return len(self.rows)

    # -- admission -------------------------------------------------------------------------

    def admit(self, rows: Sequence[Row], prefill: Prefill) -> None:
        """Append ``rows`` with their prefill; their first tokens are set by ``set_last``."""
        self.kv.admit(prefill.layers, prefill.mask)
        self.last = torch.cat([self.last, self.last.new_zeros(len(rows))])
        if prefill.positions is not None:
            self.positions = torch.cat([self.positions, prefill.positions])
        if self.seq2seq:
            self._admit_cross(prefill)
        self.rows.extend(rows)

    def _admit_cross(self, prefill: Prefill) -> None:
        new = prefill.encoder
        assert new is not None
        old = self.encoder
        if old is None or not self.rows:
            self.encoder = new
            return
        width = max(old.states.shape[1], new.states.shape[1])
        self.encoder = EncoderSide(
            states=torch.cat([left_pad(old.states, width, 1), left_pad(new.states, width, 1)]),
            mask=merge_masks(old.mask, new.mask),
            cross=merge_layers(old.cross, new.cross),
        )

    def set_last(self, first_row: int, tokens: Sequence[int]) -> None:
        """The tokens rows ``first_row ..`` feed at the next step."""
        self.last[first_row:] = torch.tensor(tokens, dtype=torch.long, device=self.device)

    # -- the step --------------------------------------------------------------------------

    def step_mask(self) -> Tensor:
        """The step's attention mask [n, 1, 1, W + 1] over the window and the new column."""
        mask = self.kv.window_mask(1)[:, None, None, :]
        if self.bool_mask:
            return mask
        return torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~mask, torch.finfo(self.dtype).min
        )

    def step_inputs(self) -> StepInputs:
        """The step's inputs (call after ``kv.open_column``)."""
        return StepInputs(self.last, self.positions, self.kv, self.step_mask(), self.encoder)

    def step(self) -> Tensor:
        """One decode step of the model for every row: next-token logits [n, V]."""
        self.kv.open_column()
        logits = self.forward.step(self.step_inputs())
        self.kv.close_column()
        if not self.seq2seq:
            self.positions += 1
        return logits

    # -- retirement ------------------------------------------------------------------------

    def retire(self) -> None:
        """Free the slots of finished rows (swap-remove; the order of ``rows`` changes)."""
        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        if len(keep) == len(self.rows):
            return
        scrub = [i for i, row in enumerate(self.rows) if row.finished and row.failed]
        order = self.kv.retire(keep, scrub)
        self.rows = [self.rows[i] for i in order]
        if not order:
            self.clear()
            return
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        self.last = self.last[index]
        if not self.seq2seq:
            self.positions = self.positions[index]
            return
        assert self.encoder is not None
        enc_mask = self.encoder.mask[index]
        drop = leading_pad_columns(enc_mask)
        self.encoder = EncoderSide(
            states=self.encoder.states[index, drop:],
            mask=enc_mask[:, drop:],
            cross=[(k[index, :, drop:], v[index, :, drop:]) for k, v in self.encoder.cross],
        )

    def clear(self) -> None:
        """No rows left: keep the slot buffers (their capacity), drop everything else."""
        self.kv.retire([], [])
        self.rows = []
        self.last = self.last[:0]
        self.positions = self.positions[:0]
        self.encoder = None

    def release(self) -> None:
        """Like ``clear``, and the slot buffers' memory goes back too (after an error)."""
        self.clear()
        self.kv.release()
