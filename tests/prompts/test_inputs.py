"""prepend_prompts: layouts, masks and positions under left and right padding."""

from __future__ import annotations

import pytest
import torch

from prompts import position_ids_from_mask, prepend_prompts

L, D = 2, 3


def _rows(values: list[float]) -> torch.Tensor:
    """Embeddings [1, T, d] whose row t is filled with ``values[t]``, so rows are recognisable."""
    return torch.tensor(values)[None, :, None].expand(1, len(values), D).clone()


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, tokens 1..3 and 4..5; prompts -1,-2 and -3,-4."""
    prompts = torch.cat([_rows([-1, -2]), _rows([-3, -4])])  # [2, L, d]
    return prompts, _rows([1, 2, 3]), _rows([4, 5])


@pytest.mark.parametrize("side", ["left", "right"])
def test_seq2seq_prompt_then_tokens_then_pads(side: str) -> None:
    prompts, a, b = _batch()
    pad = torch.full((1, 1, D), 99.0)
    b_padded = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    embeds = torch.cat([a, b_padded])  # [2, 3, d]
    mask = torch.tensor([[1, 1, 1], [0, 1, 1] if side == "left" else [1, 1, 0]])
    out = prepend_prompts(embeds, mask, prompts, causal=False)
    assert out.position_ids is None
    assert out.inputs_embeds.shape == (2, L + 3, D)
    # Nothing between prompt and tokens: relative (T5) and absolute (BART) positions of the
    # input are those it has alone.
    assert out.inputs_embeds[:, :, 0].tolist() == [[-1, -2, 1, 2, 3], [-3, -4, 4, 5, 99]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_bool_mask() -> None:
    prompts, _, b = _batch()
    embeds = torch.cat([torch.zeros(1, 1, D), b], 1)  # [1, 3, d], left-padded
    mask = torch.tensor([[False, True, True]])
    causal = prepend_prompts(embeds, mask, prompts[:1], causal=True)
    assert causal.attention_mask.tolist() == [[False, True, True, True, True]]
    seq2seq = prepend_prompts(embeds, mask, prompts[:1], causal=False)
    assert seq2seq.inputs_embeds[0, :, 0].tolist() == [-1, -2, 4, 5, 0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_pads_first_then_prompt_then_tokens(side: str) -> None:
    prompts, a, b = _batch()
    pad = torch.full((1, 1, D), 99.0)
    b_padded = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    embeds = torch.cat([a, b_padded])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1] if side == "left" else [1, 1, 0]])
    out = prepend_prompts(embeds, mask, prompts, causal=True)
    assert out.inputs_embeds[:, :, 0].tolist() == [[-1, -2, 1, 2, 3], [99, -3, -4, 4, 5]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert out.position_ids is not None
    assert out.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]


def test_causal_keeps_dtype_of_inputs() -> None:
    prompts, a, _ = _batch()
    out = prepend_prompts(
        a.to(torch.bfloat16), torch.ones(1, 3, dtype=torch.long), prompts[:1], causal=True
    )
    assert out.inputs_embeds.dtype == torch.bfloat16
    assert out.attention_mask.dtype == torch.long


def test_position_ids_from_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert position_ids_from_mask(mask).tolist() == [
        [0, 0, 0, 1, 2],
        [0, 1, 2, 3, 4],
        [0, 0, 0, 0, 0],
    ]


@pytest.mark.parametrize(
    ("embeds", "prompts"),
    [
        pytest.param((2, 3, D), (1, L, D), id="batch"),
        pytest.param((2, 3, D), (2, L, D + 1), id="width"),
        pytest.param((2, 3, D), (L, D), id="prompts-2d"),
    ],
)
def test_shape_mismatch_raises(embeds, prompts) -> None:
    with pytest.raises(ValueError, match="prompts"):
        prepend_prompts(
            torch.zeros(embeds), torch.ones(embeds[:2]), torch.zeros(prompts), causal=True
        )


@pytest.mark.parametrize("causal", [True, False])
def test_prompts_of_different_lengths_and_none(causal: bool) -> None:
    """Row 0's prompt has two rows, row 1's none (the base model): its pads move out too."""
    prompts = torch.cat([_rows([-1, -2]), _rows([0, 0])])  # [2, L, d], row 1 all padding
    prompt_mask = torch.tensor([[1, 1], [0, 0]])
    embeds = torch.cat([_rows([1, 2]), _rows([4, 0])])  # row 1: one token, one pad
    mask = torch.tensor([[1, 1], [1, 0]])
    out = prepend_prompts(embeds, mask, prompts, causal=causal, prompt_mask=prompt_mask)
    if causal:
        assert out.inputs_embeds[:, :, 0].tolist() == [[-1, -2, 1, 2], [0, 0, 0, 4]]
        assert out.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]
        assert out.position_ids is not None
        assert out.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 0]]
    else:
        assert out.inputs_embeds[:, :, 0].tolist() == [[-1, -2, 1, 2], [4, 0, 0, 0]]
        assert out.attention_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="prompt_mask"):
        prepend_prompts(embeds, mask, prompts, causal=causal, prompt_mask=prompt_mask[:, :1])
