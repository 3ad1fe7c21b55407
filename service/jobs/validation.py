"""Validation of uploaded fine-tuning files: JSONL, one example a line, in one of two formats.

- text-to-text: ``{"input": "...", "target": "..."}`` (what the trainer reads);
- chat (OpenAI's): ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
  ending with the assistant's answer; only where the backbone has a chat template.

Every problem is reported with its line number (the first ``MAX_REPORTED``), and a file with
any problem is refused whole: nothing is stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from service.errors import ApiError

MAX_REPORTED = 10
ROLES = frozenset({"system", "user", "assistant"})
Format = Literal["text", "chat"]


@dataclass(frozen=True)
class FileLimits:
    max_bytes: int
    max_lines: int
    chat_template: bool  # the backbone can render chat examples


def _line_format(record: Any) -> tuple[Format | None, str | None]:
    """(format, None) for a valid example, (None, problem) otherwise."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        return _chat_problem(record["messages"])
    for key in ("input", "target"):
        if not isinstance(record.get(key), str):
            return None, (
                f'"{key}" must be a string; expected {{"input": "...", "target": "..."}} '
                'or {"messages": [...]}'
            )
    if not record["target"].strip():
        return None, '"target" is empty'
    return "text", None


def _chat_problem(messages: Any) -> tuple[Format | None, str | None]:
    if not isinstance(messages, list) or len(messages) < 2:
        return (
            None,
            '"messages" must be a list of at least two messages (a user turn and the answer)',
        )
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            return None, (
                f'messages[{i}] must be {{"role": "system"|"user"|"assistant", "content": "..."}}'
            )
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return None, "the last message must be the assistant's (non-empty) answer to learn"
    return "chat", None


def validate_jsonl(content: bytes, limits: FileLimits) -> tuple[Format, int]:
    """The file's format and number of examples; ApiError (413/422) listing its bad lines."""
    if len(content) > limits.max_bytes:
        raise ApiError(
            413,
            "file_too_large",
            f"the file has {len(content)} bytes; the limit is {limits.max_bytes}",
        )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(
            422, "invalid_file", f"the file is not UTF-8 text (byte {e.start})"
        ) from None
    problems: list[str] = []
    formats: dict[Format, int] = {}
    examples = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        examples += 1
        if examples > limits.max_lines:
            raise ApiError(
                413,
                "file_too_large",
                f"the file has more than {limits.max_lines} examples (the limit)",
            )
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        fmt, problem = _line_format(record)
        if problem is not None:
            problems.append(f"line {number}: {problem}")
        elif fmt is not None:
            formats.setdefault(fmt, number)
    if not examples:
        raise ApiError(422, "invalid_file", "the file has no examples (it is empty)")
    if len(formats) > 1:
        problems.append(
            f"line {formats['chat']}: a chat example in a file whose line {formats['text']} is "
            "an input/target example; use one format per file"
        )
    if problems:
        more = len(problems) - MAX_REPORTED
        shown = problems[:MAX_REPORTED] + ([f"... and {more} more"] if more > 0 else [])
        raise ApiError(422, "invalid_file", "invalid fine-tuning file: " + "; ".join(shown))
    fmt = next(iter(formats))
    if fmt == "chat" and not limits.chat_template:
        raise ApiError(
            422,
            "invalid_file",
            "chat examples need a backbone with a chat template, and this one has none; "
            'upload {"input": "...", "target": "..."} lines instead',
        )
    return fmt, examples
