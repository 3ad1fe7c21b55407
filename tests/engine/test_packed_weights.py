"""RANKONE_WEIGHTS=float32-packed: float32 decode products from oneDNN's or MKL's packed
copies.

Float32 arithmetic, so held to what the float32 forward is held to: each product equals
``F.linear`` to float32 rounding, and a mixed batch decodes what HF ``generate`` decodes for
each request alone. The buckets a machine packs are
measured (``packed_rows``); the tests pack every bucket so the packed kernel runs whatever this
machine measured.
"""

from __future__ import annotations

import time

import pytest
import torch

from prompts import Backbone
from service.engine.decode import DecodeLoop
from service.engine.forwards import choose_forward
from service.engine.fused_llama import (
    LINEAR_BUCKETS,
    PACKED_BUCKETS,
    FusedLlama,
    FusedLlamaPacked,
    PackedWeight,
    Products,
    _product,
    faster_buckets,
    packed_rows,
    packing_available,
    packing_kind,
)
from service.engine.prefix_cache import PrefixCache
from service.settings import Settings
from tests.engine.conftest import DEVICE, reference_generate
from tests.engine.test_decode_reference import run_schedule

pytestmark = pytest.mark.skipif(
    packing_available(torch.device(DEVICE)) is not None,
    reason=f"float32-packed is refused here: {packing_available(torch.device(DEVICE))}",
)


@pytest.fixture
def packed(backbones: dict[str, Backbone], monkeypatch: pytest.MonkeyPatch) -> FusedLlamaPacked:
    forward = choose_forward(backbones["llama"], weights="float32-packed")
    assert isinstance(forward, FusedLlamaPacked)
    monkeypatch.setattr(forward, "packed_rows", frozenset(PACKED_BUCKETS))  # every bucket
    return forward


@pytest.mark.parametrize("by", PackedWeight.KINDS)
def test_packed_products_are_float32_products(by: str) -> None:
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(96, 64, generator=g), torch.randn(96, 1, generator=g)
    p = PackedWeight.of(w, by)
    assert p.w is w and p.by == by  # the model's own matrix, not a copy
    for n in (1, 2, 3, 8, 13, 32, 40):
        x = torch.randn(n, 64, generator=g)
        want = torch.nn.functional.linear(x, w, bias[:, 0])
        for how in (Products(packed=True), Products(), Products(linear=True, gemv=True)):
            got = _product(p, bias, x, how)
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_forward_shares_the_float32_weights(
    backbones: dict[str, Backbone], packed: FusedLlamaPacked
) -> None:
    fp32 = choose_forward(backbones["llama"])
    assert isinstance(fp32, FusedLlama) and packed.kind == "fused-f32-packed"
    assert choose_forward(backbones["llama"], weights="float32-packed") is packed
    assert packed.layers is fp32.layers  # the HF forward's, fused
    assert isinstance(packed.step_head, PackedWeight) and packed.step_head.w is fp32.head
    # prefills read the packed copies too, where their bucket (64: above 32 rows) was faster
    assert packed.prefill_layers is packed.step_layers and packed.prefill_head is packed.step_head
    assert packed.products(33, packed.step_layers[0].qkv).packed
    assert packed.products(500, packed.step_layers[0].qkv).packed
    for mine, theirs in zip(packed.step_layers, fp32.layers, strict=True):
        assert isinstance(mine.qkv, PackedWeight) and mine.qkv.w is theirs.qkv
        assert isinstance(mine.down, PackedWeight) and mine.down.w is theirs.down
    assert packed.products(4, packed.step_layers[0].qkv).packed
    assert not packed.products(1, packed.step_layers[0].qkv).packed  # one row: GEMV or GEMM
    assert not fp32.products(4, fp32.layers[0].qkv).packed


def test_packed_mixed_batch_matches_generate(
    backbones: dict[str, Backbone], packed: FusedLlamaPacked
) -> None:
    backbone = backbones["llama"]
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24), forward=packed)
    for req, sink in run_schedule(backbone, loop):
        expected = reference_generate(backbone, req.task, req.input_ids, req.params.max_new_tokens)
        assert sink.result is not None and sink.result.token_ids == expected, req.request_id


def test_packed_rows_are_measured(packed: FusedLlamaPacked) -> None:
    chosen = packed_rows(packed.step_layers, packed.linear_rows)
    assert chosen <= set(PACKED_BUCKETS)  # whichever this machine runs faster packed
    assert packed_rows([], frozenset()) == frozenset()
    kind = packing_kind(torch.device("cpu"))  # whichever packing this machine runs faster
    assert kind in PackedWeight.KINDS
    assert {w.by for layer in packed.step_layers for w in (layer.qkv, layer.down)} == {kind}


def test_a_packing_whose_numbers_are_not_float32_is_not_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """oneDNN can be told to run float32 GEMMs in bfloat16 (``fp32_precision``): a packed copy
    whose product is not float32's is refused, and the packing choice falls back to MKL's."""
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    real = PackedWeight.packed_product

    def rounded(self: PackedWeight, x: torch.Tensor) -> torch.Tensor:
        y = real(self, x)
        return y.bfloat16().float() if self.by == "onednn" else y

    monkeypatch.setattr(PackedWeight, "packed_product", rounded)
    with pytest.raises(RuntimeError, match="onednn's packed product disagrees"):
        PackedWeight.of(w, "onednn")
    packing_kind.cache_clear()
    try:
        assert packing_kind(torch.device("cpu")) == "mkl"
    finally:
        packing_kind.cache_clear()


def test_faster_buckets_picks_the_buckets_where_the_candidate_wins() -> None:
    """The calibration both product choices use: a bucket is the candidate's only where its
    pass takes under 0.9 of the current one's, each pass given that bucket's inputs."""
    seen: list[tuple[int, tuple[int, ...]]] = []

    def slow_up_to_4(n: int, xs: dict[int, torch.Tensor]) -> None:
        seen.append((n, tuple(x.shape[0] for x in xs.values())))
        if n <= 4:
            time.sleep(0.003)

    def slow_above_4(n: int, xs: dict[int, torch.Tensor]) -> None:
        if n > 4:
            time.sleep(0.003)

    assert faster_buckets({8, 16}, torch.float32, slow_up_to_4, slow_above_4) == {8, 16, 32}
    assert faster_buckets({8, 16}, torch.float32, slow_above_4, slow_up_to_4) == {2, 4}
    assert {n for n, _ in seen} == set(LINEAR_BUCKETS)
    assert all(rows == (n, n) for n, rows in seen)  # inputs [n, w], one per width


def test_packed_weights_are_refused_where_they_cannot_run(backbones: dict[str, Backbone]) -> None:
    assert "run on a CPU" in str(packing_available(torch.device("cuda")))
    with pytest.raises(ValueError, match="RANKONE_FUSED_FORWARD is false"):
        choose_forward(backbones["llama"], fused=False, weights="float32-packed")
    with pytest.raises(ValueError, match="not covered"):
        choose_forward(backbones["gpt2"], weights="float32-packed")
    assert Settings(model="m", weights="float32-packed").weights == "float32-packed"
    with pytest.raises(ValueError, match="runs in the continuous"):
        Settings(model="m", weights="float32-packed", engine="static")
