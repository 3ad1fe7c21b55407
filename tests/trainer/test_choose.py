"""The fine-tuning job's search (trainer/choose.py) on the tiny GPT-2: the closed-form start of
factors near a text prompt, the rung plan within its budget, and a search that trains every
candidate, halves them on validation loss and exports the winner as a servable artifact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prompts import Backbone, SharedPrompt, TaskFactors, compose_prompt
from prompts import load_backbone as _load
from trainer.choose import (
    Candidate,
    Start,
    choose_examples,
    fit_factors,
    rung_plan,
    split_validation,
)
from trainer.data import Example
from trainer.errors import TrainerError

L = 4


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir: Path) -> Backbone:
    return _load(tiny_gpt2_dir)


def test_fit_factors_reaches_an_exactly_representable_target() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 10, generator=g)
    u, v = torch.randn(6, 2, generator=g), torch.randn(2, 10, generator=g)
    target = compose_prompt(p, u, v)
    fu, fv = fit_factors(p, target, rank=2)
    assert torch.allclose(compose_prompt(p, fu, fv), target, atol=1e-3)
    # rank 1 cannot represent a rank-2 target: the fit is partial, but better than U V = 1
    ru, rv = fit_factors(p, target, rank=1)
    err = (compose_prompt(p, ru, rv) - target).norm()
    assert 1e-2 < err < (p - target).norm()


def test_rung_plan_stays_within_budget() -> None:
    for n, budget in ((8, 100), (6, 60), (3, 40), (1, 10)):
        plan = rung_plan(n, budget)
        sizes = [n]
        while sizes[-1] > 2:
            sizes.append(-(-sizes[-1] // 2))
        cost = sum(s * (plan[i] - (plan[i - 1] if i else 0)) for i, s in enumerate(sizes))
        assert cost <= budget and plan == sorted(plan)
    assert rung_plan(8, 100) == [6, 12, 24]  # 8·6 + 4·6 + 2·12 = 96 steps


def test_split_validation_is_seeded_and_refuses_too_few() -> None:
    rows = [Example(str(i), "x") for i in range(20)]
    train, valid = split_validation(rows, seed=3)
    assert len(valid) == 4 and len(train) == 16 and not set(train) & set(valid)
    assert split_validation(rows, seed=3) == (train, valid)
    with pytest.raises(TrainerError, match="too few"):
        split_validation(rows[:5], seed=0)


def test_search_trains_halves_and_exports_the_winner(gpt2: Backbone) -> None:
    g = torch.Generator().manual_seed(0)
    shared = SharedPrompt("family", torch.randn(L, gpt2.dim, generator=g), gpt2.fingerprint)
    source = TaskFactors(
        "src", "family", torch.ones(L, 1), torch.ones(1, gpt2.dim), gpt2.fingerprint
    )
    rows = [Example(f"word {w}", "yes") for w in "abcdefghijkl"]
    cands = [
        Candidate("factors", 0.1, 1),
        Candidate("factors", 0.1, 2),
        Candidate("paper", 0.03),
        Candidate("pt", 0.03),
    ]
    events: list[str] = []
    choice = choose_examples(
        gpt2,
        "yes-task",
        rows,
        None,
        Start(shared, [source], "Answer yes"),
        candidates=cands,
        budget_steps=16,
        final_steps=12,
        batch_size=4,
        report=lambda kind, fields: events.append(kind),
    )
    figures = {f.candidate.name: f for f in choice.figures}
    assert set(figures) == {"factors-r1-lr0.1", "factors-r2-lr0.1", "paper-r1-lr0.03", "pt-lr0.03"}
    assert choice.rungs == [2, 4] and events == ["rung", "rung", "final", "winner"]
    # the winner trained on after the search, towards 12 steps in all, in chunks of 5
    assert (
        5 <= choice.winner.final_steps <= 8 and choice.winner.steps == 4 + choice.winner.final_steps
    )
    assert choice.search_steps - choice.winner.final_steps <= 16  # the search kept its budget
    assert "more steps after the search" in choice.reason
    assert sum(f.out_at_rung == 0 for f in figures.values()) == 2  # halved once
    finalists = [f for f in figures.values() if f.out_at_rung is None]
    assert len(finalists) == 2 and all(f.val_exact_match is not None for f in finalists)
    assert choice.winner in finalists and choice.winner.candidate.name in choice.reason
    assert figures["pt-lr0.03"].init == "text"
    assert figures["factors-r1-lr0.1"].parameters == L + gpt2.dim
    assert figures["factors-r2-lr0.1"].parameters == 2 * (L + gpt2.dim)
    # the winner's artifact: its own shared prompt unless it is factors over "family"
    if choice.winner.candidate.method == "factors":
        assert choice.shared is None and choice.task.shared == "family"
    else:
        assert choice.shared is not None and choice.task.shared == choice.shared.id == "yes-task"
    assert all(f.best_val_loss <= (f.val_loss_at_0 or 0) for f in figures.values())
