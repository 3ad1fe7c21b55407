"""``rankone push`` / ``tasks`` / ``generate`` against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client import Client
from client.cli import generate_main, push_main, tasks_main
from prompts import Backbone, SharedPrompt, TaskFactors, save_shared, save_task
from tests.service.conftest import ADMIN_KEY, CLIENT_KEY, ServerProcess

L = 6


def write_artifacts(
    root: Path, bb: Backbone, sid: str, tasks: dict[str, int], fp: str = "", shared_seed: int = 7
) -> Path:
    """A trainer-like output: ``shared/<sid>`` and one task per (name, seed)."""
    g = torch.Generator().manual_seed(shared_seed)
    fingerprint = fp or bb.fingerprint
    save_shared(root, SharedPrompt(sid, torch.randn(L, bb.dim, generator=g), fingerprint))
    for name, seed in tasks.items():
        g = torch.Generator().manual_seed(seed)
        u, v = torch.randn(L, 1, generator=g), torch.randn(1, bb.dim, generator=g)
        save_task(root, TaskFactors(name, sid, u, v, fingerprint))
    return root


def run_push(server: ServerProcess, *args: str) -> int:
    return push_main([*args, "--url", server.url, "--key", ADMIN_KEY])


def test_push_creates_then_leaves_unchanged_then_replaces(
    server: ServerProcess, t5: Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = write_artifacts(tmp_path / "run", t5, "push-sp", {"push-a": 1, "push-b": 2})
    assert run_push(server, str(out), "--dry-run") == 0
    dry = capsys.readouterr().out
    assert "create     shared prompt push-sp" in dry and "create     task push-a" in dry
    assert "0 replaced" in dry and "dry run: nothing written" in dry
    with Client(server.url, ADMIN_KEY) as c:
        assert "push-a" not in {t.name for t in c.tasks.list()}

    assert run_push(server, str(out)) == 0
    first = capsys.readouterr().out
    assert "created    task push-b (version 1)" in first and ": 3 new, 0 replaced" in first

    assert run_push(server, str(out)) == 0
    assert ": 0 new, 0 replaced, 3 unchanged" in capsys.readouterr().out

    write_artifacts(tmp_path / "run", t5, "push-sp", {"push-b": 99})  # push-b retrained
    assert run_push(server, str(out)) == 0
    last = capsys.readouterr().out
    assert "replaced   task push-b (version 2)" in last and "unchanged  task push-a" in last
    with Client(server.url, CLIENT_KEY) as c:
        assert c.generate("push-b", "abc", max_new_tokens=2).version == 2

    write_artifacts(tmp_path / "run", t5, "push-sp", {"push-b": 99}, shared_seed=8)
    assert run_push(server, str(out)) == 0
    shared = capsys.readouterr().out
    assert "replaced   shared prompt push-sp (version 2): every task over it" in shared
    assert ": 0 new, 1 replaced, 2 unchanged" in shared


def test_push_refusals(
    server: ServerProcess, t5: Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    other = write_artifacts(tmp_path / "other", t5, "push-other", {"push-x": 1}, fp="not-this")
    assert run_push(server, str(other)) == 1
    assert "backbone_mismatch" in capsys.readouterr().err
    assert run_push(server, str(tmp_path / "missing")) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_push(server, str(tmp_path / "empty")) == 2
    assert "holds no artifacts" in capsys.readouterr().err


def test_tasks_and_generate_commands(
    server: ServerProcess, t5: Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = write_artifacts(tmp_path / "run", t5, "cli-sp", {"cli-task": 3})
    assert run_push(server, str(out)) == 0
    capsys.readouterr()
    admin = ["--url", server.url, "--key", ADMIN_KEY]
    assert tasks_main(["list", *admin]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("NAME") and "cli-task" in listing and "cli-sp" in listing
    assert tasks_main(["show", "cli-task", *admin]) == 0
    assert '"shared": "cli-sp"' in capsys.readouterr().out
    user = ["--url", server.url, "--key", CLIENT_KEY]
    assert generate_main(["cli-task", "abc", "hello", "--max-new-tokens", "3", *user]) == 0
    texts = capsys.readouterr().out.splitlines()
    assert len(texts) == 2
    assert generate_main(["cli-task", "hello", "--max-new-tokens", "3", "--stream", *user]) == 0
    assert capsys.readouterr().out.splitlines() == [texts[1]]
    assert tasks_main(["delete", "cli-task", *user]) == 1
    assert "HTTP 403 forbidden" in capsys.readouterr().err
    assert tasks_main(["delete", "cli-task", *admin]) == 0
    assert tasks_main(["show", "cli-task", *admin]) == 1
    assert "HTTP 404 not_found" in capsys.readouterr().err
