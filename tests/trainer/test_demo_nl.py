"""The SmolLM2 demo's pieces: deterministic NL task data with held-out tests, its CLI, and a
shortened build (teach from instructions → distill from the rank-one fit) on a tiny Llama."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from prompts import load_artifact_dir
from tests.gguf_files import build_tiny_tied_llama
from trainer.data import load_split
from trainer.demo import cli as demo_cli
from trainer.demo import nl_words as W
from trainer.demo import smollm_build
from trainer.demo.build_steps import DemoPaths
from trainer.demo.nl_tasks import (
    NL_TASKS,
    chat_row,
    formal,
    generate_split,
    split_pool,
    write_nl_task_data,
)
from trainer.init_text import resolve_init_texts


@pytest.fixture(scope="module")
def tiny_chat_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a chat template (the demo's data is chat-formatted, like SmolLM2's)."""
    return build_tiny_tied_llama(tmp_path_factory.mktemp("chat-llama"))


@pytest.mark.parametrize(
    ("informal", "expected"),
    [
        ("I can't find the report.", "I cannot find the report."),
        ("we're gonna buy the car tomorrow.", "We are going to purchase the car tomorrow."),
        ("the kids didn't like the keys.", "The children did not like the keys."),
        ("they're selling the car and other stuff.", "They are selling the car and other things."),
        ("it's the budget I told you about.", "It is the budget I told you about."),
        ("I wanna buy a new laptop.", "I want to purchase a new laptop."),
    ],
)
def test_formal_rewrite(informal: str, expected: str) -> None:
    assert formal(informal) == expected


def test_split_pool_partitions_by_position() -> None:
    items = list(range(10))
    assert split_pool(items, "test") == [3, 7]
    assert sorted(split_pool(items, "train") + split_pool(items, "test")) == items


def test_data_is_deterministic_and_tests_are_held_out(tmp_path: Path) -> None:
    sizes = write_nl_task_data(tmp_path / "a", list(NL_TASKS), 40, 8, 16, seed=0)
    write_nl_task_data(tmp_path / "b", list(NL_TASKS), 40, 8, 16, seed=0)
    write_nl_task_data(tmp_path / "c", list(NL_TASKS), 40, 8, 16, seed=1)
    assert sizes["city"] == {"train": 40, "validation": 8, "test": 16}
    for task in NL_TASKS:
        for split in ("train", "validation", "test"):
            a = (tmp_path / "a" / task / f"{split}.jsonl").read_bytes()
            assert a == (tmp_path / "b" / task / f"{split}.jsonl").read_bytes()
        assert a != (tmp_path / "c" / task / "test.jsonl").read_bytes()
        train = {r["input"] for r in generate_split(NL_TASKS[task], 200, 0, "train")}
        test = generate_split(NL_TASKS[task], 40, 0, "test")
        assert not train & {r["input"] for r in test}, task
        labels = NL_TASKS[task].labels
        assert all(not labels or r["target"] in labels for r in test)
    train_cities = {r["target"] for r in generate_split(NL_TASKS["city"], 200, 0, "train")}
    test_cities = {r["target"] for r in generate_split(NL_TASKS["city"], 40, 0, "test")}
    assert not train_cities & test_cities and test_cities <= set(W.CITIES)


def test_rows_are_written_as_user_and_assistant_turns(tmp_path: Path) -> None:
    write_nl_task_data(tmp_path, ["sentiment"], 4, 2, 3, seed=0)
    lines = (tmp_path / "sentiment" / "test.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    expected = generate_split(NL_TASKS["sentiment"], 3, 0, "test")
    assert [chat_row(r) for r in records] == expected
    # the input alone is the user turn: no instruction and no system message
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant"]
    assert records[0]["messages"][0]["content"] == expected[0]["input"]
    examples = load_split(tmp_path, "sentiment", "test")
    assert examples[0].messages == ({"role": "user", "content": expected[0]["input"]},)
    assert examples[0].target == expected[0]["target"]


def test_usage_examples_call_the_chat_route() -> None:
    text = demo_cli.usage_examples(
        "http://h:1", "city", "He was born in Oslo.", ["city"], chat=True
    )
    assert "curl -s http://h:1/v1/chat/completions" in text and "/generate" not in text
    user = '[{"role": "user", "content": "He was born in Oslo."}]'
    assert f'"model": "city", "messages": {user}' in text
    assert "client.chat.completions.create(" in text
    assert 'model "base"' in text  # the backbone alone, to compare


def test_each_task_folder_carries_its_instruction(tmp_path: Path) -> None:
    write_nl_task_data(tmp_path, ["sentiment", "city"], 4, 2, 2)
    texts = resolve_init_texts(
        ["sentiment", "city"], text=None, mapping_file=None, data_dir=tmp_path
    )
    assert texts == {t: NL_TASKS[t].instruction for t in ("sentiment", "city")}


def test_port_comes_from_the_flag_then_rankone_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANKONE_PORT", raising=False)
    assert demo_cli.env_port() == 8000
    monkeypatch.setenv("RANKONE_PORT", "18000")
    assert demo_cli.env_port() == 18000
    monkeypatch.setenv("RANKONE_PORT", "eighty")
    with pytest.raises(SystemExit, match="RANKONE_PORT='eighty' is not a port number"):
        demo_cli.env_port()
    help_text = demo_cli.build_parser().format_help()
    assert "$RANKONE_PORT" in help_text and "t5-demo" in help_text


def test_busy_port_and_t5_only_flags_are_refused_before_any_build(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port {port} on 127.0.0.1 is in use"):
            demo_cli.main(["--port", str(port), "--cache-dir", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="--pretrain-minutes applies to the T5 demo only"):
        argv = ["--no-serve", "--backbone", "smollm2", "--pretrain-minutes", "1"]
        demo_cli.main([*argv, "--cache-dir", str(tmp_path)])
    assert not (tmp_path / "c").exists()


def test_backbone_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANKONE_DEMO_BACKBONE", raising=False)
    parse = demo_cli.build_parser().parse_args
    assert demo_cli.choose_backbone(parse([])) == "smollm2"
    # older command lines (docker's compose test) that tune the T5 pretraining keep working
    assert demo_cli.choose_backbone(parse(["--pretrain-minutes", "0.4"])) == "t5-demo"
    monkeypatch.setenv("RANKONE_DEMO_BACKBONE", "t5-demo")
    assert demo_cli.choose_backbone(parse([])) == "t5-demo"
    assert demo_cli.choose_backbone(parse(["--backbone", "smollm2"])) == "smollm2"
    monkeypatch.setenv("RANKONE_DEMO_BACKBONE", "gpt5")
    with pytest.raises(SystemExit, match="RANKONE_DEMO_BACKBONE='gpt5'"):
        demo_cli.choose_backbone(parse([]))


def test_shortened_build_on_a_tiny_llama(tiny_chat_llama: Path, tmp_path: Path, capsys) -> None:
    paths = DemoPaths(tmp_path / "demo")
    recipe = smollm_build.SmolRecipe(
        tasks=["sentiment", "city"],
        n_train=8,
        n_val=2,
        n_test=4,
        prompt_length=4,
        teach_steps=2,
        distill_steps=2,
        batch_size=2,
        check_examples=2,
        progress=False,
    )
    manifest = smollm_build.build(paths, recipe, rebuild=False, model=str(tiny_chat_llama))
    out = capsys.readouterr().out
    assert "init: text 'Is the sentiment of this review positive or negative?" in out
    run = json.loads((paths.teach / "run.json").read_text())
    assert run["metrics"]["city"]["init_text"] == NL_TASKS["city"].instruction
    assert json.loads((paths.distill / "run.json").read_text())["config"]["factor_init"] == "fit"
    art = load_artifact_dir(paths.artifacts)
    # The MPT tasks over one shared prompt, and their teachers served beside them as <task>-pt.
    assert set(art.tasks) == {"sentiment", "city", "sentiment-pt", "city-pt"}
    assert {art.tasks[t].shared for t in ("sentiment", "city")} == {"mpt"}
    assert art.tasks["city-pt"].shared == "pt-city" and len(art.shared) == 3
    assert art.tasks["city-pt"].meta["teacher_of"] == "city"
    assert all(tf.u.shape == (4, 1) for tf in art.tasks.values())
    assert set(manifest["test_exact_match"]) == {"sentiment", "city"}
    assert manifest["model"] == str(tiny_chat_llama)
    assert paths.backbone.resolve() == tiny_chat_llama.resolve()
    assert "city" in demo_cli.task_table(paths, manifest)
    assert demo_cli.server_env(paths, 8123)["RANKONE_MODEL"] == str(tiny_chat_llama)
    # A second run reuses everything: no trainer stage runs again.
    again = smollm_build.build(paths, recipe, rebuild=False, model=str(tiny_chat_llama))
    assert again == manifest
    assert "rankone train" not in capsys.readouterr().out
