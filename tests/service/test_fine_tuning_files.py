"""``validate_jsonl``: the upload check of fine-tuning files, as a pure function."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.errors import ApiError
from service.handlers.fine_tuning import resolve_steps
from service.jobs.validation import FileLimits, validate_jsonl
from service.protocol.fine_tuning import Hyperparameters

CHAT = FileLimits(max_bytes=10_000, max_lines=20, chat_template=True)


def lines(*rows: Any) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (lines({"input": "a", "target": "b"}), ("text", 1)),
        (lines({"input": "", "target": "b", "extra": 1}) + b"\n  \n", ("text", 1)),
        (lines({"messages": [turn("user", "hi"), turn("assistant", "yo")]}), ("chat", 1)),
        (
            lines(
                {
                    "messages": [
                        turn("system", "be brief"),
                        turn("user", "q"),
                        turn("assistant", "a"),
                    ]
                },
                {"messages": [turn("user", "q2"), turn("assistant", "a2")]},
            ),
            ("chat", 2),
        ),
    ],
)
def test_valid_files(content: bytes, expected: tuple[str, int]) -> None:
    assert validate_jsonl(content, CHAT) == expected


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (lines({"messages": [turn("user", "q"), turn("user", "again")]}), "final assistant"),
        (lines({"messages": [turn("user", "q"), turn("assistant", "  ")]}), "empty"),
        (lines({"messages": "hello"}), '"messages" must be a list'),
        (lines({"messages": [turn("user", "q"), {"role": "assistant", "content": 3}]}), "content"),
        (lines(*[{"input": "a", "target": "b"}] * 3) + b"{bad\n" * 12, "and 2 more"),
    ],
)
def test_bad_chat_and_many_errors(content: bytes, needle: str) -> None:
    with pytest.raises(ApiError) as err:
        validate_jsonl(content, CHAT)
    assert err.value.status == 422 and needle in err.value.message


@pytest.mark.parametrize(
    ("hp", "examples", "expected"),
    [
        ({}, 20, (100, 8, 34)),  # auto: batch 8, enough epochs for 100 steps
        ({"n_epochs": 2, "batch_size": 4}, 10, (6, 4, 2)),
        ({"steps": 7, "batch_size": 3}, 10, (7, 3, 2)),
        ({"batch_size": "auto"}, 3, (100, 3, 100)),
    ],
)
def test_resolve_steps(hp: dict[str, Any], examples: int, expected: tuple[int, int, int]) -> None:
    assert resolve_steps(Hyperparameters(**hp), examples, 500) == expected


BIG = FileLimits(max_bytes=2_000_000, max_lines=20, chat_template=True)
OK = b'{"input": "a", "target": "b"}\n'


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (OK + b"[" * 100_000 + b"]" * 100_000 + b"\n", ["line 2: nests deeper than 32"]),
        (b'{"input": ' + b"[" * 5_000 + b"]" * 5_000 + b', "target": "b"}\n', ["line 1: nests"]),
        (OK * 2 + b'{"input": "a", "target": "b", "n": 1' + b"0" * 5_000 + b"}\n", ["line 3:"]),
        (b'{"input": "a", "target": "b", "n": 1.' + b"5" * 5_000 + b"}\n", ["line 1: a number"]),
        (OK + b'{"input": "a"\n, "target": "b"}\n', ["line 2: not valid JSON", "line 3:"]),
    ],
)
def test_hostile_lines_are_line_numbered_422s(content: bytes, needles: list[str]) -> None:
    with pytest.raises(ApiError) as e:
        validate_jsonl(content, BIG)
    assert e.value.status == 422
    for needle in needles:
        assert needle in e.value.message, e.value.message


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c"])
def test_only_newline_ends_a_line(separator: str) -> None:
    """U+2028 inside a JSON string is legal JSON: the line stays whole (str.splitlines would
    cut it, and the halves are not JSON)."""
    row = json.dumps({"input": f"a{separator}b", "target": "c"}, ensure_ascii=False)
    content = (row + "\n" + row + "\r\n").encode()
    assert validate_jsonl(content, BIG) == ("text", 2)
