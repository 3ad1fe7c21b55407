"""The one rule for client text: it must be Unicode that UTF-8 can carry.

JSON can spell a lone UTF-16 surrogate (``"a\\ud800b"``) that no tokenizer, UTF-8 encoder or
JSON response can take. Such text is refused at the edge (``service.api.edge``), 422 naming
the field, before any handler sees it. Everything else is accepted as sent: NUL, U+2028 and
U+2029 (legal inside JSON strings), astral characters, any script.

``readable`` is the read side of the same rule: a record stored before the rule existed (or
written behind the API) is shown with U+FFFD in place of each lone surrogate, so one bad
record can never make a listing fail.
"""

from __future__ import annotations

import re
from typing import Any

LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON escape of a surrogate code point, as raw body bytes: the only way one gets in
# (raw surrogate bytes are not UTF-8, and the JSON decoder refuses those already).
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

Path = tuple[str | int, ...]


def shown(text: str) -> str:
    """``text`` safe to put in a message: lone surrogates as ``\\udXXX`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def find_lone_surrogate(value: Any, path: Path = ()) -> tuple[Path, int] | None:
    """(where, character index) of the first lone surrogate in ``value`` (JSON: dicts, lists,
    strings; dict keys count as text of their own), or None."""
    if isinstance(value, str):
        found = LONE_SURROGATE.search(value)
        return (path, found.start()) if found else None
    if isinstance(value, dict):
        for key, item in value.items():
            in_key = LONE_SURROGATE.search(key) if isinstance(key, str) else None
            if in_key is not None:
                return (*path, shown(key)), in_key.start()
            hit = find_lone_surrogate(item, (*path, key))
            if hit is not None:
                return hit
    elif isinstance(value, list):
        for index, item in enumerate(value):
            hit = find_lone_surrogate(item, (*path, index))
            if hit is not None:
                return hit
    return None


def problem(text_at: tuple[Path, int]) -> str:
    """The message for a lone surrogate at ``text_at``."""
    return (
        f"text must be valid Unicode: a lone UTF-16 surrogate at character {text_at[1]} "
        "(a \\ud800-\\udfff escape without its pair); send the complete pair or remove it"
    )


def readable(value: Any) -> Any:
    """``value`` with every lone surrogate (in strings and keys) replaced by U+FFFD."""
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {readable(k): readable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [readable(v) for v in value]
    return value
