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


def test_adapt_starts_a_task_with_an_instruction_from_the_fit_to_its_text(
    pipeline: Pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--factor-init auto`` (the default): a task with an instruction starts from the
    factors whose composed prompt is closest to the instruction's text init (nearer than the
    source average), a task without one from the source average; run.json says which."""
    import torch

    from prompts import load_artifact_dir, load_backbone
    from trainer.adapt import load_source, task_starts
    from trainer.errors import TrainerError
    from trainer.init_text import text_init_rows
    from trainer.options import AdaptOptions

    data = tmp_path / "data"
    for task in ("told", "untold"):
        (data / task).mkdir(parents=True)
        for split in ("train", "test"):
            shutil.copy(pipeline.data / "last" / f"{split}.jsonl", data / task / f"{split}.jsonl")
    text = "Answer with the last word of the sentence."
    (data / "told" / "instruction.txt").write_text(text)
    common = ["--model", pipeline.model, "--data-dir", data, *FAST]
    adapt = ["adapt", *common, "--tasks", "told", "untold", "--steps", "2"]
    rc = main([str(a) for a in [*adapt, "--source", pipeline.distill, "--out", tmp_path / "a"]])
    assert rc == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    (metrics,) = run["metrics"].values()
    assert metrics["factor_init"] == {"told": "fit", "untold": "source"}

    backbone = load_backbone(pipeline.model)
    source = load_source(pipeline.distill, None, backbone)
    opts = AdaptOptions(
        model=str(pipeline.model),
        data_dir=data,
        out=tmp_path / "b",
        source=pipeline.distill,
        tasks=["told", "untold"],
    )
    starts = task_starts(source, opts, backbone, ["told", "untold"], torch.Generator())
    p = source.shared.prompt.float()
    target = text_init_rows(backbone, text, source.shared.length)

    def distance(name: str) -> float:
        u, v, _ = starts[name]
        return float((p * (u @ v) - target).norm())

    assert distance("told") < 0.9 * distance("untold")
    assert load_artifact_dir(tmp_path / "a").tasks.keys() == {"told", "untold"}
    with pytest.raises(TrainerError, match="no instruction for task\\(s\\) untold"):
        task_starts(
            source,
            AdaptOptions(**{**opts.__dict__, "factor_init": "fit"}),
            backbone,
            ["told", "untold"],
            torch.Generator(),
        )
    with pytest.raises(TrainerError, match="--factor-init source ignores --init-text"):
        AdaptOptions(**{**opts.__dict__, "factor_init": "source", "init_text": text})
