"""``rankone serve`` with a .gguf RANKONE_MODEL: a bad file stops it with a message naming the
variable (no traceback), exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main


def test_serve_refuses_a_bad_gguf_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(10))
    assert main(["--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rankone serve: RANKONE_MODEL (--model) = ")
    assert "Traceback" not in err and err.count("\n") <= 2
    assert "is truncated" in err
