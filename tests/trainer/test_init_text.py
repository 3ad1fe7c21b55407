"""Teacher text init: a prompt's rows start as the input embeddings of the task's instruction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prompts import compose_prompt, load_artifact_dir, load_backbone
from tests.trainer.conftest import FAST
from trainer.cli import main
from trainer.errors import TrainerError
from trainer.init_text import init_kinds, resolve_init_texts, text_init_rows


@pytest.fixture(scope="module")
def gpt2(gentle_gpt2: Path):
    return load_backbone(str(gentle_gpt2), device="cpu")


def embedding_rows(backbone, text: str) -> torch.Tensor:
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    return backbone.model.get_input_embeddings().weight.detach()[ids].float()  # [T, d]


@pytest.mark.parametrize("length", [1, 3, 7, 20])
def test_rows_are_the_text_embeddings_cycled_or_cut(gpt2, length: int) -> None:
    rows = embedding_rows(gpt2, "the red cat")  # [T, d]
    got = text_init_rows(gpt2, "the red cat", length)
    assert got.shape == (length, gpt2.dim)
    index = torch.arange(length) % rows.shape[0]
    assert torch.equal(got, rows[index])


def test_empty_text_is_refused(gpt2) -> None:
    with pytest.raises(TrainerError, match="no tokens"):
        text_init_rows(gpt2, "", 4)


def write_instruction(data: Path, task: str, text: str) -> None:
    (data / task).mkdir(parents=True, exist_ok=True)
    (data / task / "instruction.txt").write_text(text + "\n")


def test_precedence_flag_then_mapping_then_data_folder(tmp_path: Path) -> None:
    write_instruction(tmp_path, "a", "from the folder a")
    write_instruction(tmp_path, "b", "from the folder b")
    mapping = tmp_path / "texts.yaml"
    mapping.write_text("b: from the mapping b\nunused: ignored\n")
    tasks = ["a", "b", "c"]
    got = resolve_init_texts(tasks, text=None, mapping_file=mapping, data_dir=tmp_path)
    assert got == {"a": "from the folder a", "b": "from the mapping b", "c": None}
    got = resolve_init_texts(tasks, text="one for all", mapping_file=None, data_dir=tmp_path)
    assert set(got.values()) == {"one for all"}
    assert init_kinds("auto", {"a": "x", "c": None}) == {"a": "text", "c": "vocab"}
    assert init_kinds("random", {"a": "x"}) == {"a": "random"}
    with pytest.raises(TrainerError, match=r"no init text for task\(s\) c"):
        init_kinds("text", {"a": "x", "c": None})


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("texts.json", '["a list"]', "must hold a mapping"),
        ("texts.json", '{"a": ""}', "non-empty string"),
        ("texts.json", "{not json", "not valid JSON or YAML"),
        ("missing.json", None, "does not exist"),
    ],
)
def test_bad_mapping_files(tmp_path: Path, name: str, content: str | None, match: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(TrainerError, match=match):
        resolve_init_texts(["a"], text=None, mapping_file=path, data_dir=tmp_path)


def test_empty_instruction_file_is_refused(tmp_path: Path) -> None:
    write_instruction(tmp_path, "a", "  ")
    with pytest.raises(TrainerError, match=r"instruction\.txt is empty"):
        resolve_init_texts(["a"], text=None, mapping_file=None, data_dir=tmp_path)


def teach(gentle_gpt2: Path, data: Path, out: Path, *extra: object) -> int:
    argv = [
        "teach", "--model", gentle_gpt2, "--data-dir", data, "--out", out,
        *FAST, "--steps", "1", "--lr", "1e-9", "--device", "cpu", *extra,
    ]  # fmt: skip
    return main([str(a) for a in argv])


def test_teach_starts_each_teacher_from_its_instruction(
    gpt2, gentle_gpt2: Path, toy_data: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    for task in ("polarity", "first", "last"):
        (data / task).mkdir(parents=True)
        for split in ("train", "validation"):
            (data / task / f"{split}.jsonl").write_text(
                (toy_data / task / f"{split}.jsonl").read_text()
            )
    write_instruction(data, "last", "say the last word")
    mapping = tmp_path / "texts.json"
    mapping.write_text(json.dumps({"polarity": "is it good", "first": "the first word"}))
    out = tmp_path / "teach"
    assert teach(gentle_gpt2, data, out, "--init", "text", "--init-texts", mapping) == 0

    run = json.loads((out / "run.json").read_text())
    found = load_artifact_dir(out)
    expected = {"polarity": "is it good", "first": "the first word", "last": "say the last word"}
    for task, text in expected.items():
        assert run["metrics"][task]["init_text"] == text
        tf = found.tasks[task]
        assert found.shared[tf.shared].meta["init_text"] == text
        prompt = compose_prompt(found.shared[tf.shared].prompt, tf.u, tf.v)  # [L, d]
        # lr 1e-9 for one step: the trained prompt is still the text init.
        torch.testing.assert_close(prompt, text_init_rows(gpt2, text, 6), atol=1e-6, rtol=0)


def test_teach_with_init_text_but_a_task_without_one_exits_2(
    gentle_gpt2: Path, toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = teach(gentle_gpt2, toy_data, tmp_path / "out", "--tasks", "first", "--init", "text")
    err = capsys.readouterr().err
    assert rc == 2 and "no init text for task(s) first" in err and "Traceback" not in err
