"""distill's starting points: the closed-form rank-one fit of the teachers, and --init-from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prompts import compose_prompt, load_artifact_dir, load_backbone
from tests.trainer.conftest import FAST, Pipeline, run_cli
from trainer.cli import main
from trainer.config import parse_options
from trainer.distill import teacher_prompts
from trainer.errors import TrainerError
from trainer.options import DistillOptions
from trainer.rank_one_fit import rank_one_fit

TASKS = ["polarity", "first"]


def distill(pipeline: Pipeline, out: Path, *extra: object) -> list[str]:
    return [
        str(a)
        for a in (
            "distill", "--model", pipeline.model, "--data-dir", pipeline.data, *FAST,
            "--tasks", *TASKS, "--teachers", pipeline.teach, "--out", out,
            "--steps", "1", "--lr", "1e-9", *extra,
        )
    ]  # fmt: skip


def student_prompts(out: Path) -> list[torch.Tensor]:
    found = load_artifact_dir(out)
    return [
        compose_prompt(
            found.shared[found.tasks[t].shared].prompt, found.tasks[t].u, found.tasks[t].v
        )
        for t in TASKS
    ]


def test_fit_starts_from_the_closed_form(pipeline: Pipeline, tmp_path: Path) -> None:
    run_cli(*distill(pipeline, tmp_path / "fit", "--factor-init", "fit"))
    teachers = teacher_prompts(pipeline.teach, TASKS, load_backbone(str(pipeline.model)))
    shared, factors = rank_one_fit(teachers)
    for got, (u, v) in zip(student_prompts(tmp_path / "fit"), factors, strict=True):
        # lr 1e-9 for one step: the exported prompt is still the fit
        torch.testing.assert_close(got, compose_prompt(shared, u, v), atol=1e-5, rtol=0)


def test_init_from_continues_from_artifacts(pipeline: Pipeline, tmp_path: Path) -> None:
    run_cli(*distill(pipeline, tmp_path / "again", "--init-from", pipeline.distill))
    before = student_prompts(pipeline.distill)
    for got, want in zip(student_prompts(tmp_path / "again"), before, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_init_from_without_the_tasks_exits_2(pipeline: Pipeline, tmp_path: Path, capsys) -> None:
    argv = distill(pipeline, tmp_path / "x", "--init-from", pipeline.adapt)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--init-from" in err and "no factors for task(s) polarity, first" in err


def test_fit_needs_rank_one() -> None:
    argv = ["--model", "m", "--data-dir", "d", "--out", "o", "--teachers", "t"]
    with pytest.raises(TrainerError, match="--factor-init fit is a rank-one fit"):
        parse_options(DistillOptions, [*argv, "--factor-init", "fit", "--rank", "2"], "x", "")
