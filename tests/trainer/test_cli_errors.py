"""Bad input gets one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prompts import SharedPrompt, TaskFactors, load_backbone, save_shared, save_task
from tests.trainer.conftest import FAST
from trainer.cli import main
from trainer.config import parse_options
from trainer.errors import TrainerError
from trainer.options import AdaptOptions, DistillOptions, TeachOptions


def fails(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def test_missing_data_folder_and_file(capsys, gentle_t5: Path, tmp_path: Path) -> None:
    err = fails(
        capsys,
        "teach",
        "--model",
        gentle_t5,
        "--data-dir",
        tmp_path / "nope",
        "--out",
        tmp_path / "out",
    )
    assert "data folder" in err and "does not exist" in err
    (tmp_path / "data" / "t").mkdir(parents=True)
    err = fails(
        capsys,
        "teach",
        "--model",
        gentle_t5,
        "--data-dir",
        tmp_path / "data",
        "--tasks",
        "t",
        "--out",
        tmp_path / "out",
    )
    assert "train.jsonl does not exist" in err


def test_malformed_jsonl_line_is_reported_with_its_number(
    capsys, gentle_t5: Path, tmp_path: Path
) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text(
        '{"input": "a", "target": "b"}\n{"input": "c", "target": "d"}\n{"input": "e", \n'
    )
    err = fails(
        capsys, "teach", "--model", gentle_t5, "--data-dir", tmp_path, "--out", tmp_path / "o"
    )
    assert "train.jsonl:3" in err and "not valid JSON" in err
    (tmp_path / "t" / "train.jsonl").write_text('{"input": "a"}\n')
    err = fails(
        capsys, "teach", "--model", gentle_t5, "--data-dir", tmp_path, "--out", tmp_path / "o"
    )
    assert "train.jsonl:1" in err and '"target"' in err


def test_empty_task(capsys, gentle_t5: Path, tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.jsonl").write_text("\n")
    err = fails(
        capsys, "teach", "--model", gentle_t5, "--data-dir", tmp_path, "--out", tmp_path / "o"
    )
    assert "no examples" in err


def test_prompt_that_does_not_fit_the_backbone(
    capsys, gentle_t5: Path, toy_data: Path, tmp_path: Path
) -> None:
    backbone = load_backbone(gentle_t5)
    wrong = backbone.dim // 2
    save_shared(tmp_path, SharedPrompt("mpt", torch.randn(6, wrong), backbone.fingerprint))
    save_task(
        tmp_path,
        TaskFactors("first", "mpt", torch.ones(6, 1), torch.ones(1, wrong), backbone.fingerprint),
    )
    err = fails(
        capsys,
        "adapt",
        "--model",
        gentle_t5,
        "--data-dir",
        toy_data,
        "--tasks",
        "last",
        "--source",
        tmp_path,
        "--out",
        tmp_path / "o",
        *FAST,
    )
    assert f"[6, {wrong}]" in err and f"[L, {backbone.dim}]" in err


def test_artifacts_of_another_backbone_are_refused(
    capsys, gentle_t5: Path, toy_data: Path, tmp_path: Path
) -> None:
    save_shared(tmp_path, SharedPrompt("pt-first", torch.randn(6, 32), "gpt2-0123456789abcdef"))
    save_task(
        tmp_path,
        TaskFactors(
            "first", "pt-first", torch.ones(6, 1), torch.ones(1, 32), "gpt2-0123456789abcdef"
        ),
    )
    err = fails(
        capsys,
        "distill",
        "--model",
        gentle_t5,
        "--data-dir",
        toy_data,
        "--tasks",
        "first",
        "--teachers",
        tmp_path,
        "--out",
        tmp_path / "o",
        *FAST,
    )
    assert "trained on backbone 'gpt2-0123456789abcdef'" in err


def test_unknown_option_and_bad_values(capsys, tmp_path: Path) -> None:
    assert "unrecognized arguments: --stepz" in fails(capsys, "teach", "--stepz", "3")
    assert "expected an integer" in fails(
        capsys, "teach", "--model", "m", "--data-dir", "d", "--out", "o", "--steps", "many"
    )
    assert "must be > 0" in fails(
        capsys, "teach", "--model", "m", "--data-dir", "d", "--out", "o", "--lr", "0"
    )
    assert "--teachers is required" in fails(
        capsys, "distill", "--model", "m", "--data-dir", "d", "--out", "o"
    )
    assert "unknown stage" in fails(capsys, "tech")
    config = tmp_path / "run.yaml"
    config.write_text("model: m\nstepz: 3\n")
    assert "did you mean 'steps'" in fails(capsys, "teach", "--config", config)


def test_config_file_with_command_line_overrides(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: m\ndata-dir: d\nout: o\nsteps: 7\nlr: 0.1\ntasks: [a, b]\n"
        "teachers: t\nfactor_init: peft\n"
    )
    opts = parse_options(DistillOptions, ["--config", str(config), "--steps", "9"], "x", "")
    assert (opts.steps, opts.lr, opts.tasks, opts.factor_init) == (9, 0.1, ["a", "b"], "peft")
    assert opts.teachers == Path("t")
    (tmp_path / "run.json").write_text(
        '{"model": "m", "data_dir": "d", "out": "o", "init": "random", "init_text": "hi"}'
    )
    with pytest.raises(TrainerError, match="--init-text"):
        parse_options(TeachOptions, ["--config", str(tmp_path / "run.json")], "x", "")


@pytest.mark.parametrize(
    ("args", "lr"),
    [
        ([], 0.3),
        (["--train-shared"], 0.1),
        (["--mode", "paper"], 0.1),
        (["--mode", "multi-target"], 0.1),
        (["--train-shared", "--lr", "0.05"], 0.05),
        (["--lr", "0.2"], 0.2),
    ],
)
def test_adapt_lr_defaults_to_what_the_benchmark_chose_per_mode(args: list[str], lr: float) -> None:
    base = ["--model", "m", "--data-dir", "d", "--out", "o", "--source", "s", "--tasks", "t"]
    opts = parse_options(AdaptOptions, [*base, *args], "x", "")
    assert opts.lr == lr
    with pytest.raises(TrainerError, match="--lr"):
        parse_options(AdaptOptions, [*base, *args, "--lr", "0"], "x", "")


def test_command_line_error_has_no_traceback(capsys, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "teach",
            "--model",
            str(tmp_path / "m"),
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr
    help_ = subprocess.run(
        [sys.executable, "-m", "trainer", "adapt", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_.returncode == 0 and "Init of U, V: fit" in help_.stdout
    # a % in a docstring is text, not argparse formatting
    assert "37 % exact match" in " ".join(help_.stdout.split())


def test_prompt_longer_than_a_decoder_only_backbone_allows(
    capsys, gentle_gpt2: Path, toy_data: Path, tmp_path: Path
) -> None:
    err = fails(
        capsys,
        "teach",
        "--model",
        gentle_gpt2,
        "--data-dir",
        toy_data,
        "--out",
        tmp_path,
        "--prompt-length",
        "480",
        "--max-input-length",
        "32",
    )
    assert "= 544 positions" in err and "has 512" in err
