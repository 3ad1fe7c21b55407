"""Chat-formatted training examples: the input is the rendered conversation (prompts/chat.py),
exactly what /v1/chat/completions puts the soft prompt in front of."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from prompts.chat import chat_input_ids
from tests.gguf_files import build_tiny_tied_llama
from trainer.data import read_jsonl, tokenize
from trainer.errors import TrainerError

CONTEXT = [{"role": "user", "content": "i loved this movie"}]


def _write(path: Path, *records: object) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_chat_examples_tokenize_as_the_server_renders_them(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(build_tiny_tied_llama(tmp_path / "llama"))
    path = _write(
        tmp_path / "train.jsonl",
        {"messages": [*CONTEXT, {"role": "assistant", "content": "positive"}]},
        {"input": "plain", "target": "text"},
    )
    chat, plain = read_jsonl(path)
    assert chat.messages == tuple(CONTEXT) and chat.target == "positive"
    assert plain.messages is None
    rows = tokenize(tok, [chat, plain], max_input_length=200, max_target_length=8, causal=True)
    assert rows[0].input_ids == chat_input_ids(tok, CONTEXT)
    assert rows[0].target_ids == [
        *tok("positive", add_special_tokens=False).input_ids,
        tok.eos_token_id,
    ]
    assert rows[1].input_ids == tok("plain").input_ids


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        ({"messages": "hi"}, "must be a list"),
        ({"messages": CONTEXT}, "final assistant message"),
        (
            {"messages": [{"role": "x", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "role",
        ),
    ],
)
def test_bad_chat_examples_name_the_line(tmp_path: Path, record: object, needle: str) -> None:
    path = _write(tmp_path / "train.jsonl", {"input": "a", "target": "b"}, record)
    with pytest.raises(TrainerError, match=rf"train.jsonl:2: .*{needle}"):
        read_jsonl(path)
