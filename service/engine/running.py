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
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, EncoderDecoderCache

from service.engine.fused_llama import FusedLlama
from service.engine.kv_cache import SlotCache, SlotKV
from service.engine.kv_layout import KV, leading_pad_columns, left_pad, merge_layers, merge_masks
from service.engine.prefill import Prefill
from service.engine.rows import Row


def _cross_cache(layers: Sequence[KV]) -> DynamicCache:
    """A ``DynamicCache`` holding exactly these per-layer tensors (no copy)."""
    cache = DynamicCache([(k[:, :, :0], v[:, :, :0]) for k, v in layers])
    for layer, (k, v) in zip(cache.layers, layers, strict=True):
        layer.keys, layer.values = k, v
    return cache


class RunningBatch:
    """Rows in flight and their decode state (one thread: the model's)."""

    def __init__(
        self,
        model: Any,
        n_layers: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        max_rows: int = 0,
        fused: FusedLlama | None = None,
    ) -> None:
        """``fused``: the forward of decode steps (None: the HF model's own)."""
        self.model = model
        self.device = device
        self.dtype = dtype
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.kv = SlotKV(n_layers, device, dtype, min_rows=max_rows)
        self.rows: list[Row] = []
        self.last = torch.zeros(0, dtype=torch.long, device=device)  # [n]
        self.positions = torch.zeros(0, dtype=torch.long, device=device)  # [n] decoder-only
        self.cross: list[KV] = []  # seq2seq: per layer [n, H, S, Dh]
        self.enc_states: Tensor | None = None  # [n, S, d]
        self.enc_mask: Tensor | None = None  # [n, S]
        self.cache: SlotCache | EncoderDecoderCache = SlotCache(self.kv)
        # Bool masks are what SDPA takes directly; other kernels add a float mask.
        self.bool_mask = getattr(model.config, "_attn_implementation", "eager") == "sdpa"
        self.fused = fused

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
        assert prefill.cross is not None
        assert prefill.enc_states is not None and prefill.enc_mask is not None
        if self.enc_states is None or self.enc_mask is None or not self.rows:
            self.cross = prefill.cross
            self.enc_states, self.enc_mask = prefill.enc_states, prefill.enc_mask
        else:
            self.cross = merge_layers(self.cross, prefill.cross)
            width = max(self.enc_states.shape[1], prefill.enc_states.shape[1])
            self.enc_states = torch.cat(
                [left_pad(self.enc_states, width, 1), left_pad(prefill.enc_states, width, 1)]
            )
            self.enc_mask = merge_masks(self.enc_mask, prefill.enc_mask)
        self.cache = EncoderDecoderCache(SlotCache(self.kv), _cross_cache(self.cross))

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

    def forward(self) -> Tensor:
        """One decode step of the model for every row: next-token logits [n, V]."""
        self.kv.open_column()
        mask = self.step_mask()
        if self.fused is not None:
            logits = self.fused.step(self.last, self.positions, self.kv, mask)
        else:
            logits = self.hf_forward(mask)
        self.kv.close_column()
        if not self.seq2seq:
            self.positions += 1
        return logits

    def hf_forward(self, mask: Tensor) -> Tensor:
        """The step through the HF model's own forward (the open column is written)."""
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
        return out.logits[:, -1]

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
        assert self.enc_mask is not None and self.enc_states is not None
        enc_mask = self.enc_mask[index]
        drop = leading_pad_columns(enc_mask)
        self.enc_mask = enc_mask[:, drop:]
        self.enc_states = self.enc_states[index, drop:]
        self.cross = [(k[index, :, drop:], v[index, :, drop:]) for k, v in self.cross]
        self.cache = EncoderDecoderCache(SlotCache(self.kv), _cross_cache(self.cross))

    def clear(self) -> None:
        """No rows left: keep the slot buffers (their capacity), drop everything else."""
        self.kv.retire([], [])
        self.rows = []
        self.last = self.last[:0]
        self.positions = self.positions[:0]
        self.cross, self.enc_states, self.enc_mask = [], None, None
        self.cache = SlotCache(self.kv)

    def release(self) -> None:
        """Like ``clear``, and the slot buffers' memory goes back too (after an error)."""
        self.clear()
        self.kv.release()
