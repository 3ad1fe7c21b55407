"""Composition math: equal to PEFT's MultitaskPromptEmbedding, batched equal to per-task."""

from __future__ import annotations

import pytest
import torch
from peft import MultitaskPromptTuningConfig, TaskType
from peft.tuners.multitask_prompt_tuning.model import MultitaskPromptEmbedding

from prompts import compose_prompt, compose_prompts, identity_factors
from prompts.compose import compose_rows

L, D = 5, 8


def _peft_module(prompt: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor):
    """PEFT's MPT prompt module holding ``prompt`` [L, d], ``cols`` [T, L, r], ``rows`` [T, r, d]."""
    num_tasks, length, rank = cols.shape
    config = MultitaskPromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=length,
        token_dim=prompt.shape[1],
        num_transformer_submodules=1,
        num_attention_heads=1,
        num_layers=1,
        num_tasks=num_tasks,
        num_ranks=rank,
    )
    module = MultitaskPromptEmbedding(config, torch.nn.Embedding(10, prompt.shape[1]))
    with torch.no_grad():
        module.embedding.weight.copy_(prompt)
        module.prefix_task_cols.copy_(cols)
        module.prefix_task_rows.copy_(rows)
    return module


@pytest.mark.parametrize("rank", [1, 3])
def test_compose_prompt_equals_peft(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    num_tasks = 3
    prompt = torch.randn(L, D, generator=gen)
    cols = torch.randn(num_tasks, L, rank, generator=gen)
    rows = torch.randn(num_tasks, rank, D, generator=gen)
    module = _peft_module(prompt, cols, rows)
    task_ids = torch.arange(num_tasks)
    with torch.no_grad():
        expected = module(torch.arange(L).expand(num_tasks, L), task_ids)  # [T, L, d]
    for k in range(num_tasks):
        got = compose_prompt(prompt, cols[k], rows[k])
        torch.testing.assert_close(got, expected[k], rtol=1e-6, atol=1e-6)
    # The prompt differs between tasks, so the comparison above can tell them apart.
    assert not torch.allclose(expected[0], expected[1])


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_batched_equals_per_task(rank: int) -> None:
    gen = torch.Generator().manual_seed(10 + rank)
    shared = torch.randn(3, L, D, generator=gen)  # S = 3 shared prompts
    index = torch.tensor([2, 0, 0, 1, 2])
    u = torch.randn(5, L, rank, generator=gen)
    v = torch.randn(5, rank, D, generator=gen)
    batched = compose_prompts(shared, index, u, v)
    assert batched.shape == (5, L, D)
    for b in range(5):
        alone = compose_prompt(shared[int(index[b])], u[b], v[b])
        torch.testing.assert_close(batched[b], alone, rtol=1e-6, atol=1e-6)
        expected = shared[int(index[b])] * (u[b] @ v[b])
        torch.testing.assert_close(batched[b], expected, rtol=1e-6, atol=1e-6)


def test_empty_batch() -> None:
    shared = torch.randn(1, L, D)
    out = compose_prompts(
        shared, torch.zeros(0, dtype=torch.long), torch.zeros(0, L, 1), torch.zeros(0, 1, D)
    )
    assert out.shape == (0, L, D)


def test_shared_index_picks_the_right_shared_prompt() -> None:
    shared = torch.stack([torch.full((L, D), 1.0), torch.full((L, D), 2.0)])  # [2, L, d]
    u, v = identity_factors(L, D)
    out = compose_prompts(shared, torch.tensor([1, 0, 1]), u.expand(3, L, 1), v.expand(3, 1, D))
    assert out[:, 0, 0].tolist() == [2.0, 1.0, 2.0]


def test_bf16_shared_with_fp32_factors_keeps_the_shared_dtype() -> None:
    gen = torch.Generator().manual_seed(7)
    shared = torch.randn(1, L, D, generator=gen).to(torch.bfloat16)
    u = torch.randn(2, L, 1, generator=gen)
    v = torch.randn(2, 1, D, generator=gen)
    out = compose_prompts(shared, torch.zeros(2, dtype=torch.long), u, v)
    assert out.dtype == torch.bfloat16
    expected = shared.float() * (u @ v)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("shared", "index", "u", "v"),
    [
        pytest.param((L, D), (1,), (1, L, 1), (1, 1, D), id="shared-2d"),
        pytest.param((1, L, D), (1, 1), (1, L, 1), (1, 1, D), id="index-2d"),
        pytest.param((1, L, D), (1,), (L, 1), (1, 1, D), id="u-2d"),
        pytest.param((1, L, D), (2,), (1, L, 1), (1, 1, D), id="index-batch"),
        pytest.param((1, L, D), (1,), (1, L, 2), (1, 1, D), id="rank-mismatch"),
        pytest.param((1, L, D), (1,), (2, L, 1), (1, 1, D), id="batch-mismatch"),
        pytest.param((1, L, D), (1,), (1, L + 1, 1), (1, 1, D), id="length-mismatch"),
        pytest.param((1, L, D), (1,), (1, L, 1), (1, 1, D + 1), id="dim-mismatch"),
    ],
)
def test_wrong_shapes_raise(shared, index, u, v) -> None:
    with pytest.raises(ValueError, match=r"expects|mismatch|do not fit"):
        compose_prompts(
            torch.zeros(shared),
            torch.zeros(index, dtype=torch.long),
            torch.zeros(u),
            torch.zeros(v),
        )


def test_compose_prompt_wrong_rank_of_tensor_raises() -> None:
    with pytest.raises(ValueError, match=r"expects prompt \[L, d\]"):
        compose_prompt(torch.zeros(1, L, D), torch.zeros(L, 1), torch.zeros(1, D))


@pytest.mark.parametrize("rank", [1, 4])
def test_identity_factors_leave_the_prompt_unchanged(rank: int) -> None:
    prompt = torch.randn(L, D, generator=torch.Generator().manual_seed(3))
    u, v = identity_factors(L, D, rank)
    assert u.shape == (L, rank) and v.shape == (rank, D)
    torch.testing.assert_close(compose_prompt(prompt, u, v), prompt)


def test_identity_factors_refuse_rank_zero() -> None:
    with pytest.raises(ValueError, match="rank must be >= 1"):
        identity_factors(L, D, 0)


def test_compose_rows_groups_lengths_ranks_and_shared_prompts() -> None:
    """Rows over three shared prompts (one of L = 0) with ranks 1 and 2, in any order, each
    equal to its own ``compose_prompt``."""
    g = torch.Generator().manual_seed(0)
    shared = [torch.randn(4, D, generator=g), torch.randn(4, D, generator=g), torch.zeros(0, D)]
    rows = [(0, 1), (1, 2), (2, 1), (0, 2), (1, 1)]  # (shared index, rank)
    u = [torch.randn(shared[s].shape[0], r, generator=g) for s, r in rows]
    v = [torch.randn(r, D, generator=g) for _, r in rows]
    got = compose_rows(shared, [s for s, _ in rows], u, v)
    assert [tuple(p.shape) for p in got] == [(4, D), (4, D), (0, D), (4, D), (4, D)]
    for (s, _), p, ub, vb in zip(rows, got, u, v, strict=True):
        assert torch.equal(p, compose_prompt(shared[s], ub, vb))
