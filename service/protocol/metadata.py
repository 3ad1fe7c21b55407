"""Free-form JSON a client may store (task / shared-prompt ``metadata``): bounded and standard.

Checked before anything is written, so every stored value can be served back: at most
``MAX_DEPTH`` levels of nesting, at most ``MAX_BYTES`` of compact JSON, and finite numbers only
(NaN and Infinity are not JSON; Python's ``json`` would write them anyway).
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 8
MAX_BYTES = 16 * 1024


def check_json(value: Any, *, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES) -> Any:
    """``value`` unchanged if it is bounded standard JSON; else ValueError saying what is wrong."""
    _walk(value, depth=1, max_depth=max_depth, path="")
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > max_bytes:
        raise ValueError(f"metadata is {size} bytes of JSON; the limit is {max_bytes} bytes")
    return value


def _walk(value: Any, *, depth: int, max_depth: int, path: str) -> None:
    if isinstance(value, dict | list):
        if depth > max_depth:
            raise ValueError(f"metadata nests deeper than {max_depth} levels (at {path or '.'})")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if not isinstance(key, str | int):
                raise ValueError(f"metadata keys must be strings (at {path or '.'})")
            _walk(item, depth=depth + 1, max_depth=max_depth, path=f"{path}/{key}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"metadata numbers must be finite, got {value} (at {path or '.'})")
    elif value is not None and not isinstance(value, str | int | float | bool):
        raise ValueError(f"metadata values must be JSON (at {path or '.'})")
