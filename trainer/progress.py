"""Progress a person and a log reader can both follow.

On a terminal a stage shows a tqdm bar that redraws in place. Anywhere else (a file, docker
logs, CI, a pipe) a redrawn bar is one growing line of carriage returns that a log read line by
line never sees, so the same stage writes whole lines instead: one every ``every_s`` seconds
and one at the end, each with the step, the elapsed time and an estimate of the time left.

Observers (``observe``) hear every update of every bar, whichever form it takes: the demo adds
them up into one overall line for its whole build.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

# (label, steps done, total steps) after each update of any bar
Observer = Callable[[str, int, int], None]
_observers: list[Observer] = []
LINE_EVERY_S = 10.0


@contextmanager
def observe(observer: Observer) -> Iterator[None]:
    """Call ``observer(label, done, total)`` on every bar update while the block runs."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def clock(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``)."""
    s = max(0, round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class LineProgress:
    """tqdm's calls (``update``, ``set_postfix``, ``close``) writing whole lines: at most one
    every ``every_s`` seconds, and one at the end."""

    def __init__(
        self,
        total: int,
        label: str,
        *,
        initial: int = 0,
        every_s: float = LINE_EVERY_S,
        file: TextIO | None = None,
        now: Callable[[], float] = time.monotonic,
        unit: str = "step",
    ) -> None:
        """``unit``: what is counted (``""``: a percentage only, for a bar counting one)."""
        self.total, self.label, self.n, self.every_s = total, label, initial, every_s
        self.unit = unit
        self.file = file if file is not None else sys.stderr
        self.now = now
        self.start = self.last_line = now()
        self.initial = initial
        self.postfix = ""
        self.closed = False

    def line(self) -> str:
        elapsed = self.now() - self.start
        done = self.n - self.initial
        share = f"{100 * self.n / self.total:.0f}%" if self.total else ""
        text = f"{self.label}: " + (
            f"{self.unit} {self.n}/{self.total}" + (f" ({share})" if share else "")
            if self.unit
            else share
        )
        text += f", {clock(elapsed)} elapsed"
        if done > 0 and self.n < self.total:
            text += f", ~{clock(elapsed / done * (self.total - self.n))} left"
        return f"{text}{', ' + self.postfix if self.postfix else ''}"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.now() - self.last_line >= self.every_s:
            self._write()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _write(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self.last_line = self.now()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write()


class Progress:
    """One stage's progress: a tqdm bar on a terminal, ``LineProgress`` elsewhere, nothing
    when disabled; observers hear every update in all three cases."""

    def __init__(
        self,
        total: int,
        label: str,
        *,
        initial: int = 0,
        enabled: bool = True,
        file: TextIO | None = None,
        unit: str = "step",
        **tqdm_options: Any,
    ) -> None:
        """``tqdm_options`` (``bar_format``, ...) apply to the terminal's bar only."""
        self.total, self.label, self.n = total, label, initial
        out = file if file is not None else sys.stderr
        self.bar: Any = None
        if enabled and out.isatty():
            from tqdm import tqdm

            options = {"dynamic_ncols": True, "leave": False, **tqdm_options}
            self.bar = tqdm(total=total, initial=initial, desc=label, file=out, **options)
        elif enabled:
            self.bar = LineProgress(total, label, initial=initial, file=out, unit=unit)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        for observer in list(_observers):
            observer(self.label, self.n, self.total)

    def set_postfix(self, **values: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
