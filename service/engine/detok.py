"""Incremental detokenization and stop strings, for streaming text that never goes back.

Text is re-decoded from all generated ids (byte-level BPE merges and ByT5 bytes only make
sense together), and a delta is released only up to a *stable* end: never into an incomplete
multi-byte character (a trailing U+FFFD) and never into a suffix that could still grow into a
stop string, which will be cut from the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def stable_end(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` may be released: no trailing U+FFFD, no partial stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == REPLACEMENT:
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[end - k : end] == stop[:k]:
                hold = max(hold, k)
                break
    return end - hold


class IncrementalDetokenizer:
    """Turns one row's generated ids into text deltas and detects its stop strings."""

    def __init__(
        self, tokenizer: Any, stops: Sequence[str] = (), special_ids: frozenset[int] | None = None
    ) -> None:
        self.tokenizer = tokenizer
        # Filtering special ids here is what ``skip_special_tokens`` does, without the slow
        # tokenizers recomputing their special-token list on every call.
        self.special_ids = special_ids
        self.stops = tuple(s for s in stops if s)
        self.ids: list[int] = []
        self._kept: list[int] = []  # ``ids`` less ``special_ids``, grown with each token
        self.text = ""  # the whole output so far (cut before a stop string once one appears)
        self.released = ""  # what deltas have carried so far; always a prefix of the output
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the newly releasable text (may be empty).

        After a stop string appears, ``text`` is cut before it and ``stopped`` is set.
        """
        self.ids.append(token_id)
        if self.special_ids is None:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        else:
            if token_id not in self.special_ids:
                self._kept.append(token_id)
            text = self.tokenizer.decode(self._kept, skip_special_tokens=False)
        at = find_stop(text, self.stops)
        if at is not None:
            self.text = text[:at]
            self.stopped = True
            return self.flush()
        self.text = text
        return self._release(stable_end(text, self.stops))

    def flush(self) -> str:
        """Release whatever is left (the row is finished)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        # A decode that rewrote already-released text (possible only with odd byte sequences)
        # releases nothing more; the final result still carries the whole text.
        if end <= len(self.released) or not self.text.startswith(self.released):
            return ""
        delta = self.text[len(self.released) : end]
        self.released += delta
        return delta
