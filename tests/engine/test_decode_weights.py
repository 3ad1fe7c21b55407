"""RANKONE_WEIGHTS=int8 / int4 / bfloat16: the fused forward's decode steps from low-precision
copies.

Not exact against float32 (that is measured on the real model by ``bench.weights_quality``);
what holds here: the products stay within their rounding of float32, rows never see each other
(a mixed batch decodes what each request decodes alone), prefills stay float32, the model's own
float32 forward is untouched, and the setting is refused where it cannot run.
"""

from __future__ import annotations

import pytest
import torch

from prompts import Backbone
from service.engine import fused_llama
from service.engine.decode import DecodeLoop
from service.engine.forwards import choose_forward
from service.engine.fused_llama import (
    Bf16Weight,
    FusedLlama,
    FusedLlamaBf16,
    FusedLlamaInt4,
    FusedLlamaInt8,
    Int4Weight,
    Int8Weight,
    Products,
    _product,
)
from service.engine.prefill import Prefiller
from service.engine.prefix_cache import PrefixCache
from service.engine.rows import LoopStats
from service.settings import Settings
from tests.engine.conftest import TEXTS, make_tasks, request, row
from tests.engine.test_decode_reference import run_schedule

KINDS = {
    "int8": (Int8Weight, FusedLlamaInt8),
    "int4": (Int4Weight, FusedLlamaInt4),
    "bfloat16": (Bf16Weight, FusedLlamaBf16),
}
HEADS = {"int8": Int8Weight, "int4": Int8Weight, "bfloat16": Bf16Weight}  # the lm_head's copy


def test_int8_products_stay_within_rounding_and_rows_are_independent() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    q = Int8Weight.of(w)
    assert q.q.dtype == torch.int8 and q.scale.dtype == torch.bfloat16
    b = Bf16Weight.of(w)
    if b.prepacked is None:  # no oneDNN bfloat16 here: the plain matrix
        assert b.w is not None and b.w.dtype == torch.bfloat16 and b.w.is_contiguous()
    else:  # oneDNN's layout of the same matrix; the plain one beside it only for the kernels
        assert torch.equal(b.prepacked.to_dense(), w.bfloat16())
        assert (b.w is not None) == fused_llama.kernels_run(w.device)
        assert b.w is None or torch.equal(b.w, w.bfloat16())
    x = torch.randn(8, 64, generator=g)
    exact = x @ w.t()
    for copy in (q, b):
        got = _product(copy, None, x, Products())
        assert got.dtype == torch.float32 and got.shape == exact.shape
        # 8-bit weights or bfloat16 (8-bit mantissas), bfloat16 activations: about 1 % of the
        # output's scale, not more
        assert float((got - exact).abs().max()) < 0.02 * float(exact.abs().max())
        assert float((got - exact).abs().max()) > 0  # and it is not the float32 product
        alone = torch.cat([_product(copy, None, x[i : i + 1], Products()) for i in range(8)])
        torch.testing.assert_close(got, alone, rtol=0, atol=0)  # rows independent
        by_gemv = torch.cat(
            [_product(copy, None, x[i : i + 1], Products(gemv=True)) for i in range(8)]
        )
        torch.testing.assert_close(by_gemv, got, rtol=1e-2, atol=1e-2)  # a GEMV: rounding only
        bias = torch.randn(96, 1, generator=g)
        torch.testing.assert_close(_product(copy, bias, x, Products()), got + bias.t())


def test_bf16_copies_prepacked_or_plain_compute_the_same_products(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """oneDNN's prepacked bfloat16 copy where this CPU has it, the plain matrix elsewhere (or
    where a prepacked product would not equal the GEMM's): the same numbers to bfloat16
    rounding, rows independent either way."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(96, 64, generator=g), torch.randn(5, 64, generator=g)
    made = Bf16Weight.of(w)
    monkeypatch.setattr(fused_llama, "_onednn_bf16", lambda device: False)
    plain = Bf16Weight.of(w)
    assert plain.prepacked is None and plain.w is not None
    for how in (Products(), Products(gemv=True)):
        want = _product(plain, None, x, how)
        torch.testing.assert_close(_product(made, None, x, how), want, rtol=1e-2, atol=1e-2)
        alone = torch.cat([_product(made, None, x[i : i + 1], how) for i in range(5)])
        assert torch.equal(alone, _product(made, None, x, how))
    if made.prepacked is not None:  # and a prepacked product that is not the GEMM's is refused
        monkeypatch.setattr(fused_llama, "_onednn_bf16", lambda device: True)
        monkeypatch.setattr(
            torch.ops.mkldnn, "_linear_pointwise", lambda x, *a: torch.zeros(x.shape[0], 96)
        )
        assert Bf16Weight.of(w).prepacked is None


@pytest.mark.parametrize("weights", sorted(KINDS))
def test_copies_step_near_float32_and_keep_the_model_exact(
    backbones: dict[str, Backbone], q4_llama: Backbone, weights: str
) -> None:
    copy_type, forward_type = KINDS[weights]
    # int4: a model whose weights are 4-bit blocks, as a Q4_1 file's are (on the tiny model's
    # large random weights 4 bits lose ~5 % of each weight; test_int4_weights bounds that)
    backbone = q4_llama if weights == "int4" else backbones["llama"]
    ids = torch.tensor([[1, 5, 9, 2, 7]], device=backbone.device)
    with torch.inference_mode():
        before = backbone.model(input_ids=ids).logits
    fp32 = choose_forward(backbone)
    low = choose_forward(backbone, weights=weights)
    assert isinstance(fp32, FusedLlama) and isinstance(low, forward_type)
    assert low.kind == forward_type.kind and choose_forward(backbone, weights=weights) is low
    assert low.embed_tokens is fp32.embed_tokens and low.head is fp32.head
    assert all(isinstance(layer.down, copy_type) for layer in low.step_layers)
    assert isinstance(low.step_head, HEADS[weights])  # the lm_head too
    assert low.layers is fp32.layers  # prefills: the float32 layers, shared
    assert fp32.step_head is fp32.head
    assert all(isinstance(layer.qkv, torch.Tensor) for layer in fp32.step_layers)
    with torch.inference_mode():  # the HF forward (generate, the trainer) reads float32 still
        assert torch.equal(backbone.model(input_ids=ids).logits, before)

    tasks = make_tasks(backbone)
    logits = {}
    for name, forward in (("fp32", fp32), ("low", low)):
        loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward)
        loop.admit([row(request(backbone, tasks[i], TEXTS[i], f"r{i}"))[0] for i in range(3)])
        with torch.inference_mode():
            loop.batch.kv.open_column()
            logits[name] = forward.step(loop.batch.step_inputs())
    scale = float(logits["fp32"].abs().max())
    # a tiny random model with large weights (init range 0.3): a few % of the scale
    torch.testing.assert_close(logits["low"], logits["fp32"], rtol=0, atol=0.1 * scale)
    assert not torch.equal(logits["low"], logits["fp32"])

    # int8, int4: a prefill is the float32 one, number for number; bfloat16 prefills from its
    # copies
    prefilled = []
    for forward in (fp32, low):
        rows = [row(request(backbone, tasks[i], TEXTS[i], f"r{i}"))[0] for i in range(3)]
        with torch.inference_mode():
            prefilled.append(Prefiller(backbone, None, LoopStats(), forward)(rows).logits)
    assert torch.equal(prefilled[0], prefilled[1]) == (weights != "bfloat16")
    assert (low.prefill_layers is fp32.layers) == (weights != "bfloat16")
    scale = float(prefilled[0].abs().max())
    torch.testing.assert_close(prefilled[1], prefilled[0], rtol=0, atol=0.1 * scale)


@pytest.mark.parametrize("weights", sorted(KINDS))
def test_copies_mixed_batch_decodes_what_each_request_decodes_alone(
    backbones: dict[str, Backbone], weights: str
) -> None:
    backbone = backbones["llama"]
    forward = choose_forward(backbone, weights=weights)
    mixed = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=forward)
    for req, sink in run_schedule(backbone, mixed):
        alone = DecodeLoop(backbone, prefix_cache=None, forward=forward)
        r, solo = row(req)
        alone.admit([r])
        while alone.running:
            alone.step()
        assert sink.result is not None and solo.result is not None
        assert sink.result.token_ids == solo.result.token_ids, req.request_id


@pytest.mark.parametrize("weights", sorted(KINDS))
def test_copies_are_refused_where_they_cannot_run(
    backbones: dict[str, Backbone], weights: str
) -> None:
    with pytest.raises(ValueError, match="RANKONE_FUSED_FORWARD is false"):
        choose_forward(backbones["llama"], fused=False, weights=weights)
    with pytest.raises(ValueError, match="not covered"):
        choose_forward(backbones["gpt2"], weights=weights)
    with pytest.raises(ValueError, match="weights must be one of"):
        choose_forward(backbones["llama"], weights="int2")
    for env in ({"engine": "static"}, {"fused_forward": False}):
        with pytest.raises(ValueError, match=f"RANKONE_WEIGHTS={weights} runs in the continuous"):
            Settings(model="m", weights=weights, **env)  # type: ignore[arg-type]
    assert Settings(model="m", weights=weights).weights == weights
