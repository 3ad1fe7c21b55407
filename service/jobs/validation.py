"""Validation of uploaded fine-tuning files: JSONL, one example a line, in one of two formats.

- text-to-text: ``{"input": "...", "target": "..."}`` (what the trainer reads);
- chat (OpenAI's): ``{"messages": [{"role": "user", "content": "..."}, ...]}`` ending with the
  assistant's answer (checked by the trainer's rule, ``prompts.chat.split_chat_example``); only
  where the backbone has a chat template.

Lines are split on ``\n`` only (a ``\r\n`` ending is fine): U+2028 and U+2029 are legal inside
JSON strings and stay there. A line nests at most ``MAX_DEPTH`` arrays/objects and its numbers
have at most ``MAX_NUMBER_CHARS`` characters (Python's decoder would otherwise recurse to its
limit, or refuse a 5,000-digit integer with an error of its own).

Every problem is reported with its line number (the first ``MAX_REPORTED``), and a file with
any problem is refused whole: nothing is stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from prompts.chat import split_chat_example
from prompts.errors import RankoneError
from service.errors import ApiError

MAX_REPORTED = 10
MAX_DEPTH = 32  # nested arrays/objects in one line (an example needs 3: messages → message)
MAX_NUMBER_CHARS = 100  # characters of one JSON number
Format = Literal["text", "chat"]


@dataclass(frozen=True)
class FileLimits:
    max_bytes: int
    max_lines: int
    chat_template: bool  # the backbone can render chat examples


class LineError(ValueError):
    """One line's problem, without its line number."""


def _number(text: str, convert: Any) -> Any:
    if len(text) > MAX_NUMBER_CHARS:
        raise LineError(f"a number has {len(text)} characters; the limit is {MAX_NUMBER_CHARS}")
    return convert(text)


def _depth(value: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        )
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_line(line: str) -> Any:
    """One JSON value, bounded; LineError naming the problem."""
    try:
        record = json.loads(
            line,
            parse_int=lambda t: _number(t, int),
            parse_float=lambda t: _number(t, float),
        )
    except json.JSONDecodeError as e:
        raise LineError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise LineError(f"nests deeper than {MAX_DEPTH} arrays/objects") from None
    if _depth(record) > MAX_DEPTH:
        raise LineError(f"nests deeper than {MAX_DEPTH} arrays/objects")
    return record


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
    """The trainer's own rule (prompts.chat): a context, then the assistant's answer."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None, '"messages" must be a list of {"role": ..., "content": ...} objects'
    try:
        _, target = split_chat_example(messages)
    except RankoneError as e:
        return None, str(e)
    if not target.strip():
        return None, "the last (assistant) message is empty: it is the target to learn"
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
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip(" \t\r"):
            continue
        examples += 1
        if examples > limits.max_lines:
            raise ApiError(
                413,
                "file_too_large",
                f"the file has more than {limits.max_lines} examples (the limit)",
            )
        try:
            record = parse_line(line)
        except LineError as e:
            problems.append(f"line {number}: {e}")
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
    found: Format = next(iter(formats))
    if found == "chat" and not limits.chat_template:
        raise ApiError(
            422,
            "invalid_file",
            "chat examples need a backbone with a chat template, and this one has none; "
            'upload {"input": "...", "target": "..."} lines instead',
        )
    return found, examples
