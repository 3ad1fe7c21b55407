"""README's "Your first task" walkthrough, run as written: its ``bash`` blocks, in order, in
one shell, on the tiny pipeline's backbone and distilled prompts instead of the demo's, with
2 training steps. The ``sh`` block (the server, a second terminal) is a real ``rankone serve``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.service.conftest import ServerProcess
from tests.trainer.conftest import Pipeline

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- walkthrough:start -->", "<!-- walkthrough:end -->"


def walkthrough_blocks() -> list[tuple[str, str]]:
    """(info string, body) of every fenced block between the walkthrough markers."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(START) : readme.index(END)]
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.S | re.M)


def shortened(script: str, demo: Path) -> str:
    """The walkthrough's commands, on the test's demo folder and with 2 training steps."""
    lines = []
    for line in script.splitlines():
        if line.startswith(("source .venv/bin/activate", "rankone demo ")):
            continue  # the test's PATH has `rankone`; the demo folder is the tiny pipeline
        if line.startswith("DEMO="):
            line = f"DEMO={demo}"
        if line.startswith("export RANKONE_URL="):
            continue  # set by the test: the server's free port
        lines.append(line.replace("--steps 300", "--steps 2"))
    return "\n".join(lines)


def fake_demo(root: Path, pipeline: Pipeline) -> Path:
    """``$DEMO`` as `rankone demo` lays it out: backbone/, runs/distill/, artifacts/."""
    demo = root / "demo"
    (demo / "runs").mkdir(parents=True)
    (demo / "backbone").symlink_to(pipeline.model)
    (demo / "runs" / "distill").symlink_to(pipeline.distill)
    (demo / "artifacts").symlink_to(pipeline.distill)
    return demo


def path_with_rankone(bin_dir: Path) -> str:
    """A PATH on which `rankone` and `python` are this checkout's (as after activating .venv)."""
    bin_dir.mkdir()
    for name, target in (("rankone", "-m rankone_cli"), ("python", "")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {sys.executable} {target} "$@"\n')
        script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_readme_walkthrough_runs(pipeline: Pipeline, tmp_path: Path) -> None:
    blocks = walkthrough_blocks()
    kinds = [kind for kind, _ in blocks]
    assert kinds.count("bash") >= 5 and kinds.count("sh") == 1, kinds
    demo = fake_demo(tmp_path, pipeline)
    serve = next(body for kind, body in blocks if kind == "sh")
    assert "RANKONE_ADMIN_KEYS=admin-secret" in serve and "rankone serve" in serve
    env = {
        "RANKONE_MODEL": str(demo / "backbone"),
        "RANKONE_SEED_DIR": str(demo / "artifacts"),
        "RANKONE_ADMIN_KEYS": "admin-secret",
        "RANKONE_DATA_DIR": str(tmp_path / "store"),
        "RANKONE_LOG_LEVEL": "WARNING",
    }
    work = tmp_path / "work"
    work.mkdir()
    scripts = [shortened(body, demo) for kind, body in blocks if kind == "bash"]
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
    assert result.returncode == 0, f"{out}\n{result.stderr[-3000:]}"
    readme = (ROOT / "README.md").read_text()
    # the outputs the README shows for these steps are the ones printed
    for line in (
        '{"input": "ynbiqp", "target": "pqibny"}',
        "adapt (factors-only): 1 task(s) written to runs/reverse",
        "created    task reverse (version 1)",
    ):
        assert line in readme and line in out, line
    assert re.search(r"unchanged  shared prompt \S+\n", out)
    assert f"pushed runs/reverse to {server.url}: 1 new, 0 replaced, 1 unchanged" in out
    assert re.search(r"mpt reverse +exact_match=[\d.]+", out)
    assert re.search(r"^reverse +\S+ +1 +1 +6 ", out, flags=re.M)  # tasks list: v1, rank 1, L 6
    assert '"task":"reverse"' in out  # curl's JSON answer
