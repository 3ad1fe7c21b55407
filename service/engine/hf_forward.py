"""The Hugging Face model's own forward behind the engine's seam (any backbone, seq2seq too).

Prefills run over a fresh ``DynamicCache`` (holding a cached past, if any); decode steps over
the running batch's ``SlotKV`` through ``kv_cache.SlotCache``, transformers' cache API over
the slots (and, for seq2seq, the rows' fixed cross-attention keys/values).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, EncoderDecoderCache

from prompts.backbone import Backbone
from service.engine.forward import EncoderSide, Forward, Seq2SeqPrefill, StepInputs
from service.engine.kv_cache import SlotCache
from service.engine.kv_layout import KV


def cache_layers(cache: Any) -> list[KV]:
    """A ``DynamicCache``'s per-layer (keys, values)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cross_cache(layers: Sequence[KV]) -> DynamicCache:
    """A ``DynamicCache`` holding exactly these per-layer tensors (no copy)."""
    cache = DynamicCache([(k[:, :, :0], v[:, :, :0]) for k, v in layers])
    for layer, (k, v) in zip(cache.layers, layers, strict=True):
        layer.keys, layer.values = k, v  # type: ignore[union-attr]
    return cache


class HFForward(Forward):
    kind = "hf"

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.model: Any = backbone.model
        self._cross: tuple[list[KV], DynamicCache] | None = None  # the batch's, rebuilt on change

    def embed(self, ids: Tensor) -> Tensor:
        return self.backbone.embed(ids)

    def prefill(
        self, embeds: Tensor, positions: Tensor, mask: Tensor, past: list[KV] | None = None
    ) -> tuple[Tensor, list[KV]]:
        cache = DynamicCache(past) if past is not None else DynamicCache()
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1], cache_layers(cache)

    def prefill_seq2seq(self, embeds: Tensor, mask: Tensor) -> Seq2SeqPrefill:
        encoder = self.model.get_encoder()
        states = encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        start_id = self.model.config.decoder_start_token_id
        first = torch.full(
            (embeds.shape[0], 1), int(start_id), dtype=torch.long, device=embeds.device
        )
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        out = self.model(
            encoder_outputs=(states,),
            attention_mask=mask,
            decoder_input_ids=first,
            cache=cache,
            use_cache=True,
        )
        return Seq2SeqPrefill(
            logits=out.logits[:, -1],
            layers=cache_layers(cache.self_attention_cache),
            encoder=EncoderSide(states, mask, cache_layers(cache.cross_attention_cache)),
        )

    def step(self, inputs: StepInputs) -> Tensor:
        cache = SlotCache(inputs.kv)
        if inputs.encoder is None:
            out = self.model(
                input_ids=inputs.tokens[:, None],
                attention_mask=inputs.mask,
                position_ids=inputs.positions[:, None],
                cache=cache,
                use_cache=True,
            )
            return out.logits[:, -1]
        encoder = inputs.encoder
        out = self.model(
            encoder_outputs=(encoder.states,),
            attention_mask=encoder.mask,
            decoder_input_ids=inputs.tokens[:, None],
            decoder_attention_mask=inputs.mask,
            cache=EncoderDecoderCache(cache, self._cross_cache(encoder.cross)),
            use_cache=True,
        )
        return out.logits[:, -1]

    def _cross_cache(self, cross: list[KV]) -> DynamicCache:
        """The cross-attention cache over ``cross``, built once per change of the batch."""
        if self._cross is None or self._cross[0] is not cross:
            self._cross = (cross, _cross_cache(cross))
        return self._cross[1]
