"""RANKONE_WEIGHTS=int8: the fused forward's decoder-layer products from 8-bit weight copies.

Not exact against float32 (that is measured on the real model by ``bench.int8_quality``); what
holds here: the products stay within int8 rounding of float32, rows never see each other (a
mixed batch decodes what each request decodes alone), prefills stay float32, the model's own
float32 forward is untouched, and the setting is refused where it cannot run.
"""

from __future__ import annotations

import pytest
import torch

from prompts import Backbone
from service.engine.decode import DecodeLoop
from service.engine.forwards import choose_forward
from service.engine.fused_llama import FusedLlama, FusedLlamaInt8, Int8Weight, _product
from service.engine.prefill import Prefiller
from service.engine.prefix_cache import PrefixCache
from service.engine.rows import LoopStats
from service.settings import Settings
from tests.engine.conftest import TEXTS, make_tasks, request, row
from tests.engine.test_decode_reference import run_schedule


def test_int8_products_stay_within_rounding_and_rows_are_independent() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    q = Int8Weight.of(w)
    assert q.q.dtype == torch.int8 and q.scale.dtype == torch.bfloat16
    x = torch.randn(8, 64, generator=g)
    exact = x @ w.t()
    got = _product(q, None, x)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    # int8 weights and bfloat16 activations: about 1 % of the output's scale, not more
    assert float((got - exact).abs().max()) < 0.02 * float(exact.abs().max())
    assert float((got - exact).abs().max()) > 0  # and it is not the float32 product
    alone = torch.cat([_product(q, None, x[i : i + 1]) for i in range(8)])
    assert torch.equal(got, alone)  # a row's numbers do not depend on the other rows
    bias = torch.randn(96, 1, generator=g)
    torch.testing.assert_close(_product(q, bias, x), got + bias.t())


def test_int8_forward_steps_near_float32_and_keeps_the_model_exact(
    backbones: dict[str, Backbone],
) -> None:
    backbone = backbones["llama"]
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.inference_mode():
        before = backbone.model(input_ids=ids).logits
    fp32 = choose_forward(backbone)
    int8 = choose_forward(backbone, weights="int8")
    assert isinstance(fp32, FusedLlama) and isinstance(int8, FusedLlamaInt8)
    assert int8.kind == "fused-int8" and choose_forward(backbone, weights="int8") is int8
    assert int8.embed_tokens is fp32.embed_tokens and int8.head is fp32.head
    assert all(isinstance(layer.down, Int8Weight) for layer in int8.step_layers)
    assert int8.layers is fp32.layers  # prefills: the float32 layers, shared
    assert not any(isinstance(layer.qkv, Int8Weight) for layer in fp32.step_layers)
    with torch.inference_mode():  # the HF forward (generate, the trainer) reads float32 still
        assert torch.equal(backbone.model(input_ids=ids).logits, before)

    tasks = make_tasks(backbone)
    logits = {}
    for name, forward in (("fp32", fp32), ("int8", int8)):
        loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward)
        loop.admit([row(request(backbone, tasks[i], TEXTS[i], f"r{i}"))[0] for i in range(3)])
        with torch.inference_mode():
            loop.batch.kv.open_column()
            logits[name] = forward.step(loop.batch.step_inputs())
    scale = float(logits["fp32"].abs().max())
    # a tiny random model with large weights (init range 0.3): int8 costs a few % of the scale
    torch.testing.assert_close(logits["int8"], logits["fp32"], rtol=0, atol=0.1 * scale)
    assert not torch.equal(logits["int8"], logits["fp32"])

    # a prefill is the float32 one, number for number
    prefilled = []
    for forward in (fp32, int8):
        rows = [row(request(backbone, tasks[i], TEXTS[i], f"r{i}"))[0] for i in range(3)]
        with torch.inference_mode():
            prefilled.append(Prefiller(backbone, None, LoopStats(), forward)(rows).logits)
    assert torch.equal(prefilled[0], prefilled[1])


def test_int8_mixed_batch_decodes_what_each_request_decodes_alone(
    backbones: dict[str, Backbone],
) -> None:
    backbone = backbones["llama"]
    forward = choose_forward(backbone, weights="int8")
    mixed = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward)
    for req, sink in run_schedule(backbone, mixed):
        alone = DecodeLoop(backbone, prefix_cache=None, forward=forward)
        r, solo = row(req)
        alone.admit([r])
        while alone.running:
            alone.step()
        assert sink.result is not None and solo.result is not None
        assert sink.result.token_ids == solo.result.token_ids, req.request_id


def test_int8_is_refused_where_it_cannot_run(backbones: dict[str, Backbone]) -> None:
    with pytest.raises(ValueError, match="RANKONE_FUSED_FORWARD is false"):
        choose_forward(backbones["llama"], fused=False, weights="int8")
    with pytest.raises(ValueError, match="not covered"):
        choose_forward(backbones["gpt2"], weights="int8")
    with pytest.raises(ValueError, match="weights must be one of"):
        choose_forward(backbones["llama"], weights="int4")
    for env in ({"engine": "static"}, {"fused_forward": False}):
        with pytest.raises(ValueError, match="RANKONE_WEIGHTS=int8 runs in the continuous"):
            Settings(model="m", weights="int8", **env)  # type: ignore[arg-type]
    assert Settings(model="m", weights="int8").weights == "int8"
