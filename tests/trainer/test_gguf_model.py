"""The trainer's --model takes a .gguf file: artifacts carry the same fingerprint as the HF copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from prompts import load_artifact_dir, load_backbone
from tests.gguf_files import build_tiny_tied_llama, write_tiny_llama_gguf
from tests.trainer.conftest import FAST, run_cli
from trainer.cli import main


@pytest.fixture
def gguf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "gguf-cache"
    monkeypatch.setenv("RANKONE_GGUF_CACHE_DIR", str(cache))
    return cache


def test_teach_on_a_gguf_file(tmp_path: Path, toy_data: Path, gguf_cache: Path) -> None:
    hf = build_tiny_tied_llama(tmp_path / "hf", d_model=32)
    gguf = write_tiny_llama_gguf(hf, tmp_path / "tiny.gguf")
    out = tmp_path / "teach"
    run_cli("teach", "--model", gguf, "--data-dir", toy_data, "--tasks", "polarity",
            "--steps", "2", "--out", out, *FAST)  # fmt: skip
    artifacts = load_artifact_dir(out)
    assert artifacts.tasks and any(gguf_cache.iterdir())
    fingerprint = load_backbone(hf).fingerprint
    assert all(t.backbone == fingerprint for t in artifacts.tasks.values())


def test_a_bad_gguf_file_is_one_line_and_exit_2(
    tmp_path: Path, toy_data: Path, gguf_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(10))
    rc = main(["teach", "--model", str(bad), "--data-dir", str(toy_data), "--out",
               str(tmp_path / "out"), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "is truncated" in err
