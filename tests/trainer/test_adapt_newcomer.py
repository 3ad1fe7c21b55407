"""A new user's first adapt: no validation.jsonl, L from the source, evaluate --no-progress."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.trainer.conftest import FAST, Pipeline
from trainer.cli import main


def test_adapt_without_validation_records_the_sources_length(
    pipeline: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data" / "mine"
    data.mkdir(parents=True)
    for split in ("train", "test"):  # no validation.jsonl
        shutil.copy(pipeline.data / "last" / f"{split}.jsonl", data / f"{split}.jsonl")
    common = ["--model", pipeline.model, "--data-dir", tmp_path / "data", *FAST]
    adapt = ["adapt", *common, "--tasks", "mine", "--steps", "2", "--source", pipeline.distill]
    rc = main([str(a) for a in [*adapt, "--prompt-length", "20", "--out", tmp_path / "adapt"]])
    assert rc == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "adapt" / "run.json").read_text())
    assert run["config"]["prompt_length"] == 6  # the source's L, not the option's 20
    assert (tmp_path / "adapt" / "tasks" / "mine.safetensors").is_file()
    data_opts = ["--model", pipeline.model, "--data-dir", tmp_path / "data", "--no-progress"]
    evaluate = ["evaluate", *data_opts, "--tasks", "mine", "--eval-limit", "4", "--no-bare"]
    rc = main(
        [
            str(a)
            for a in [
                *evaluate,
                "--methods",
                f"mpt={tmp_path / 'adapt'}",
                "--out",
                tmp_path / "eval",
            ]
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "mine" in (tmp_path / "eval" / "eval.md").read_text()
