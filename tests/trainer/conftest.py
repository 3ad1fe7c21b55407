"""Fixtures of the trainer tests: gentle tiny backbones (default init, see tests/tiny_models), toy JSONL tasks, one shared pipeline run.

The pipeline (teach → distill → adapt) runs once per session from the CLI and several tests
inspect its artifacts, which keeps the folder fast on a loaded CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tiny_models import build_tiny_gpt2, build_tiny_t5
from tests.trainer.toy_data import write_toy_tasks
from trainer.cli import main

# Small and quick: every stage uses these unless a test says otherwise.
FAST = [
    "--prompt-length",
    "6",
    "--batch-size",
    "8",
    "--no-progress",
    "--log-every",
    "1",
    "--max-input-length",
    "32",
    "--max-target-length",
    "8",
]


@pytest.fixture(scope="session")
def gentle_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("models") / "t5", d_model=32, wide_init=False)


@pytest.fixture(scope="session")
def gentle_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2", d_model=32, wide_init=False)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_tasks(tmp_path_factory.mktemp("data"))


@dataclass
class Pipeline:
    model: Path
    data: Path
    teach: Path
    distill: Path
    adapt: Path


def run_cli(*argv: object) -> None:
    rc = main([str(a) for a in argv])
    assert rc == 0, f"rankone train {argv[0]} exited with {rc}"


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory, gentle_t5: Path, toy_data: Path) -> Pipeline:
    root = tmp_path_factory.mktemp("runs")
    common = ["--model", gentle_t5, "--data-dir", toy_data, *FAST]
    run_cli(
        "teach",
        *common,
        "--tasks",
        "polarity",
        "first",
        "--steps",
        "12",
        "--lr",
        "0.3",
        "--out",
        root / "teach",
    )
    run_cli(
        "distill",
        *common,
        "--tasks",
        "polarity",
        "first",
        "--steps",
        "12",
        "--lr",
        "0.05",
        "--teachers",
        root / "teach",
        "--out",
        root / "distill",
        "--eval-every",
        "6",
    )
    run_cli(
        "adapt",
        *common,
        "--tasks",
        "last",
        "--steps",
        "6",
        "--source",
        root / "distill",
        "--out",
        root / "adapt",
    )
    return Pipeline(gentle_t5, toy_data, root / "teach", root / "distill", root / "adapt")
