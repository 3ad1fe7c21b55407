"""How fast an engine's queue drains: the ``Retry-After`` a full queue answers with.

``DrainRate`` counts finished requests in a sliding window of wall-clock time. A client told
to retry after ``depth / rate`` seconds comes back about when the requests ahead of it have
left, instead of after a constant that is too short under load and too long when idle.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

MIN_RETRY_S = 1
MAX_RETRY_S = 60


class DrainRate:
    """Finished requests per second over the last ``window_s`` seconds (thread-safe)."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._started = clock()
        self._done: deque[float] = deque()  # finish times, oldest first
        self._lock = threading.Lock()

    def record(self, n: int = 1) -> None:
        now = self.clock()
        with self._lock:
            self._done.extend([now] * n)
            self._trim(now)

    def rate(self) -> float:
        """Requests per second; 0.0 when nothing finished within the window."""
        now = self.clock()
        with self._lock:
            self._trim(now)
            # Over the window, or over the engine's life while it is younger than that.
            span = min(self.window_s, max(now - self._started, 1.0))
            return len(self._done) / span

    def retry_after_s(self, depth: int) -> int:
        """Whole seconds until ``depth`` waiting requests have drained, in [1, 60].

        Nothing finished within the window: the queue drains no faster than one window.
        """
        rate = self.rate()
        wait = depth / rate if rate > 0 else self.window_s
        return int(min(MAX_RETRY_S, max(MIN_RETRY_S, math.ceil(wait))))

    def _trim(self, now: float) -> None:
        while self._done and now - self._done[0] > self.window_s:
            self._done.popleft()
