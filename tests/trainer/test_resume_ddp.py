"""Checkpoints resume to the same result as an uninterrupted run; torchrun ranks stay identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from prompts import load_artifact_dir
from tests.trainer.conftest import FAST, run_cli


def tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    found = load_artifact_dir(run_dir)
    out = {f"shared/{k}": sp.prompt for k, sp in found.shared.items()}
    for name, tf in found.tasks.items():
        out[f"{name}/u"], out[f"{name}/v"] = tf.u, tf.v
    return out


def test_resume_continues_to_the_uninterrupted_result(
    gentle_t5: Path, toy_data: Path, tmp_path: Path
) -> None:
    common = [
        "teach",
        "--model",
        gentle_t5,
        "--data-dir",
        toy_data,
        "--tasks",
        "polarity",
        *FAST,
        "--steps",
        "6",
        "--grad-accum",
        "2",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "2",
        "--schedule",
        "cosine",
        "--warmup-steps",
        "1",
    ]
    run_cli(*common, "--out", tmp_path / "straight")
    run_cli(*common, "--out", tmp_path / "resumed", "--stop-after", "3")
    assert not (tmp_path / "resumed" / "tasks").exists()  # stopped: nothing exported yet
    state = torch.load(
        tmp_path / "resumed" / "checkpoints" / "teach-polarity.pt", weights_only=True
    )
    assert state["step"] == 3 and state["micro_batches"] == 6
    run_cli(*common, "--out", tmp_path / "resumed", "--resume")
    straight, resumed = tensors(tmp_path / "straight"), tensors(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_torchrun_two_processes_train_and_agree(
    gentle_t5: Path, toy_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "trainer",
        "teach",
        "--model",
        str(gentle_t5),
        "--data-dir",
        str(toy_data),
        "--tasks",
        "first",
        *map(str, FAST),
        "--steps",
        "4",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--optimizer",
        "adafactor",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = (out / "ddp" / "teach-first.rank0.sha256").read_text()
    rank1 = (out / "ddp" / "teach-first.rank1.sha256").read_text()
    assert rank0 == rank1
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    assert "first" in load_artifact_dir(out).tasks
