"""docs/first-task.md, run as written: its ``bash`` blocks, in order, in one shell, against a
real ``rankone serve`` laid out as the demo's (embedded store, no keys, the fine-tuning worker
child) on a tiny chat Llama instead of SmolLM2, with 1 epoch / 2 steps of training."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from bench.first_task import PAGE, scores, walkthrough_blocks
from prompts import SharedPrompt, TaskFactors, load_backbone
from prompts.artifacts import save_shared, save_task
from tests.gguf_files import build_tiny_tied_llama
from tests.service.conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


def shortened(script: str) -> str:
    """The page's commands with a test-sized training budget; `rankone` is already on PATH."""
    lines = [line for line in script.splitlines() if not line.startswith("source .venv/")]
    text = "\n".join(lines)
    return text.replace('"n_epochs": 12', '"n_epochs": 1').replace("--steps 60", "--steps 2")


def fake_demo(work: Path, model: Path) -> Path:
    """``.rankone/demo-smollm2`` as `rankone demo` leaves it: backbone/ and runs/distill/ (an
    MPT shared prompt ``mpt`` and two tasks over it), on the tiny model."""
    demo = work / ".rankone" / "demo-smollm2"
    distill = demo / "runs" / "distill"
    bb = load_backbone(model)
    g = torch.Generator().manual_seed(0)
    save_shared(distill, SharedPrompt("mpt", torch.randn(4, bb.dim, generator=g), bb.fingerprint))
    for name in ("alpha", "beta"):
        u, v = 1 + 0.1 * torch.randn(4, 1, generator=g), 1 + 0.1 * torch.randn(1, bb.dim)
        save_task(distill, TaskFactors(name, "mpt", u, v, bb.fingerprint))
    (demo / "backbone").symlink_to(model)
    return demo


def path_with_rankone(bin_dir: Path) -> str:
    """A PATH on which `rankone` and `python` are this checkout's (as after activating .venv)."""
    bin_dir.mkdir()
    for name, target in (("rankone", "-m rankone_cli"), ("python", "")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {sys.executable} {target} "$@"\n')
        script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_first_task_walkthrough_runs(tmp_path: Path) -> None:
    blocks = walkthrough_blocks()
    scripts = [shortened(body) for kind, body in blocks if kind == "bash"]
    assert len(scripts) == 6, [kind for kind, _ in blocks]
    model = build_tiny_tied_llama(tmp_path / "tiny-chat", seed=3)
    work = tmp_path / "work"
    demo = fake_demo(work, model)
    env = {
        "RANKONE_MODEL": str(demo / "backbone"),
        "RANKONE_SEED_DIR": str(demo / "runs" / "distill"),
        "RANKONE_DATA_DIR": str(tmp_path / "store"),
        "RANKONE_LOG_LEVEL": "WARNING",
    }
    server = ServerProcess(env, tmp_path / "server.log").start()
    try:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "\n".join(scripts)],
            cwd=work,
            env={
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "PATH": path_with_rankone(tmp_path / "bin"),
                "RANKONE_URL": server.url,
            },
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        server.stop()
    out = result.stdout
    print(out)  # shown when an assertion below fails
    assert result.returncode == 0, f"{out}\n{result.stderr[-3000:]}\n{server.logs()}"
    page = PAGE.read_text()
    # the outputs the page shows for the examples are the ones printed
    for line in ("train 42", "validation 12", "test 20", '"content": "cacti"}]}'):
        assert line in page and line in out, line
    assert "job created: task 'plural' from shared prompt 'mpt'" in out
    assert "the job succeeded: valid loss" in out and "succeeded plural" in out
    assert len(re.findall(r"job created", out)) == 1  # the loop prints each event once
    assert "'base'" in out.split("succeeded plural")[1]  # /v1/models lists the base model
    assert set(scores(out)) == {"task", "base", "base + instruction"}
    assert '"object":"chat.completion"' in out and '"model":"plural"' in out  # curl
    assert re.search(r"replaced +task plural \(version 2\)", out)  # push over the job's task
    assert re.search(r"^plural +mpt +2 +1 +4 ", out, flags=re.M)  # tasks list: v2, rank 1, L 4
