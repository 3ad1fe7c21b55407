"""RANKONE_WEIGHTS=int4: decode products from 4-bit copies in llama.cpp's Q4_1 form.

On weights that are 4-bit blocks already (a Q4_1 GGUF file: the demo's SmolLM2) the copy holds
the file's levels exactly and differs only by its block scales' rounding to bfloat16; on other
weights by at most half a level more. The products run with bfloat16 activations, so, like
int8 and bfloat16, int4 is measured against float32 (``bench.weights_quality``), not held
exact; what holds here: the copy's levels, its products against float32 products of those
levels, rows never seeing each other (``test_decode_weights`` runs the mixed-batch and
refusal tests for int4 too).
"""

from __future__ import annotations

import pytest
import torch

from prompts import Backbone
from service.engine import one_row
from service.engine.forwards import choose_forward
from service.engine.fused_llama import (
    FusedLlamaInt4,
    Int4Weight,
    Int8Weight,
    Products,
    _product,
    kernels_run,
)

BF16_STEP = 2.0**-8  # bfloat16's relative rounding step


def q4_1(n: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A [n, d] matrix as a Q4_1 file dequantizes it (per block of 32, ``s · q + m`` with
    half-precision ``s``, ``m``; levels ``q`` spanning 0..15), and its levels."""
    q = torch.randint(0, 16, (n, d // 32, 32), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    q = q[..., torch.randperm(32, generator=g)]
    scale = (torch.rand(n, d // 32, 1, generator=g) * 0.01 + 1e-3).half().float()
    low = (-torch.rand(n, d // 32, 1, generator=g) * 0.08).half().float()
    return (scale * q + low).reshape(n, d), q.reshape(n, d)


def test_a_q4_1_matrix_keeps_its_levels_and_rounds_only_its_scales() -> None:
    g = torch.Generator().manual_seed(0)
    w, q = q4_1(96, 128, g)
    copy = Int4Weight.of(w)
    assert copy.shape == (96, 128) and copy.scales_zeros.shape == (4, 96, 2)
    assert copy.scales_zeros.dtype == torch.bfloat16
    assert copy.packed.numel() == 96 * 128 // 2  # two levels a byte: an eighth of float32
    levels = copy.levels()  # read back from the CPU packing
    assert torch.equal(levels, copy.levels(q.to(torch.uint8)))  # the file's own levels
    # what remains is the scales' rounding: at most ~8 levels' worth of a bfloat16 step
    blocks = w.reshape(96, 4, 32)
    span = (blocks.amax(-1) - blocks.amin(-1)).repeat_interleave(32, 1)
    bound = (8 * span / 15 + w.abs().max()) * BF16_STEP
    assert bool(((levels - w).abs() <= bound).all())
    assert 0 < copy.error < 8 * BF16_STEP


def test_other_weights_are_copied_within_half_a_level() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g)
    copy = Int4Weight.of(w)
    blocks = w.reshape(64, 3, 32)
    half_level = ((blocks.amax(-1) - blocks.amin(-1)) / 30).repeat_interleave(32, 1)
    diff = (copy.levels() - w).abs()
    assert bool((diff <= half_level + 2 * float(w.abs().max()) * BF16_STEP).all())
    assert copy.error == pytest.approx(float(diff.max()) / float(w.abs().max()), rel=1e-5)
    assert copy.error > 8 * BF16_STEP  # lossy: more than the scales' rounding
    constant = Int4Weight.of(torch.full((16, 32), 0.25))  # a block with one value: no division
    assert constant.error == 0 and torch.equal(constant.levels(), torch.full((16, 32), 0.25))


def test_int4_products_are_products_of_the_levels_with_bfloat16_rows() -> None:
    g = torch.Generator().manual_seed(2)
    w, _ = q4_1(96, 64, g)
    bias = torch.randn(96, 1, generator=g)
    copy = Int4Weight.of(w)
    levels = copy.levels()
    for n in (1, 2, 3, 8, 13, 40):
        x = torch.randn(n, 64, generator=g)
        want = torch.nn.functional.linear(x.bfloat16().float(), levels, bias[:, 0])
        for how in (Products(), Products(gemv=True), Products(linear=True)):
            got = _product(copy, bias, x, how)
            assert got.dtype == torch.float32 and got.shape == want.shape
            # bfloat16 rounding inside the kernel and of its output: within a few bfloat16
            # steps of the output's scale (a wrong level or scale would be off by ~10 %)
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=0, atol=4 * BF16_STEP * scale)
        alone = torch.cat([_product(copy, None, x[i : i + 1], Products()) for i in range(n)])
        assert torch.equal(alone, _product(copy, None, x, Products()))  # rows independent


def test_one_row_products_run_rankones_4_bit_kernel_where_it_runs() -> None:
    """Where rankone's 4-bit kernel runs (AVX512-BF16), a copy of whole tiles of 64 rows keeps
    its levels in the kernel's layout too, and its one-row products (``Products.kernel``) are
    the kernel's: within rounding of torch's int4 kernel; products of several rows, and copies
    without tiles, stay torch's."""
    g = torch.Generator().manual_seed(4)
    w, _ = q4_1(128, 64, g)
    copy = Int4Weight.of(w)
    runs = kernels_run(torch.device("cpu")) and one_row.has_q4()
    assert (copy.tiles is not None) == runs
    assert Int4Weight.of(q4_1(96, 64, g)[0]).tiles is None  # 96 rows: not whole tiles
    if copy.tiles is None:
        pytest.skip("rankone's 4-bit kernel does not run here (no AVX512-BF16)")
    x = torch.randn(1, 64, generator=g)
    got = _product(copy, None, x, Products(kernel=True))
    assert torch.equal(got, one_row.product_q4(x, *copy.tiles).bfloat16().float())
    torchs = _product(copy, None, x, Products())
    scale = float(torchs.abs().max())
    torch.testing.assert_close(got, torchs, rtol=0, atol=4 * BF16_STEP * scale)
    x3 = torch.randn(3, 64, generator=g)
    assert torch.equal(
        _product(copy, None, x3, Products(kernel=True)), _product(copy, None, x3, Products())
    )


def test_shapes_without_a_copy_stay_float32() -> None:
    assert Int4Weight.fits(torch.zeros(48, 64))
    assert not Int4Weight.fits(torch.zeros(40, 64))  # output dim: the CPU kernel's tiles of 16
    assert not Int4Weight.fits(torch.zeros(48, 48))  # input dim: whole blocks of 32
    w = torch.zeros(40, 64)
    assert FusedLlamaInt4.copy(w) is w


def test_int4_forward_copies_the_layers_in_4_bits_and_the_head_in_8(
    backbones: dict[str, Backbone],
) -> None:
    forward = choose_forward(backbones["llama"], weights="int4")
    fp32 = choose_forward(backbones["llama"])
    assert isinstance(forward, FusedLlamaInt4) and forward.kind == "fused-int4"
    assert all(
        isinstance(w, Int4Weight)
        for layer in forward.step_layers
        for w in (layer.qkv, layer.o, layer.gate_up, layer.down)
    )
    assert isinstance(forward.step_head, Int8Weight)  # the lm_head: 8 bits (a file's Q8_0)
    assert forward.layers is fp32.layers and forward.prefill_head is fp32.head  # prefills
    # the tiny model's random weights are not 4-bit blocks: a lossy copy, and it says so
    assert forward.copy_error > 8 * BF16_STEP


def test_int4_copies_of_4_bit_weights_with_bfloat16_scales_are_exact(q4_llama: Backbone) -> None:
    forward = choose_forward(q4_llama, weights="int4")
    # q4_llama's blocks were made by Int4Weight itself: their scales are bfloat16 already
    assert isinstance(forward, FusedLlamaInt4) and forward.copy_error == 0
