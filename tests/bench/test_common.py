"""bench.common: a result's header (command, date, machine), as ``run_lines`` reports it."""

from __future__ import annotations

import re

import pytest

from bench.common import run_header, run_lines


def test_run_header_is_the_command_that_ran_its_date_and_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.argv", ["window_steps.py", "--rows", "1", "--note", "alone"])
    header = run_header("bench.window_steps", {"cpu": "x", "load_average_1m": 0.5}, " (part)")
    assert list(header) == ["command", "date", "machine"]
    assert header["command"] == "python -m bench.window_steps --rows 1 --note alone (part)"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", header["date"])
    lines = run_lines(header)
    assert lines[0] == f"Command: `{header['command']}` — {header['date']}"
    assert lines[2] == "Machine: cpu x, load_average_1m 0.5"
