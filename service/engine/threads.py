"""torch's intra-op threads belong to the model thread alone.

The server runs the model in one thread (the engine's) and everything else (the event loop,
request parsing, factor decoding) in others. With torch's OpenMP backend every thread that runs
a parallel op gets a team of its own, and on a CPU with no core to spare a second team slows
the model thread's ops badly: measured on SmolLM2-135M, 2 cores, a 32-row decode step took
250-330 ms from a worker thread once the main thread had loaded the model with 2 threads, and
132-140 ms when the main thread had run torch single-threaded (as fast as the main thread
stepping itself). So the event-loop thread runs torch on one thread (``reserve_for_model``,
before the backbone is loaded), and the model thread takes the threads (``enter_model_thread``).
"""

from __future__ import annotations

import torch

_default: int | None = None  # torch's thread count before the first reservation


def reserve_for_model() -> int:
    """The calling thread runs torch single-threaded from now on; returns the thread count the
    process had (torch's default: the cores, or ``OMP_NUM_THREADS``), for the model thread."""
    global _default
    if _default is None:
        _default = torch.get_num_threads()
    torch.set_num_threads(1)
    return _default


def release() -> None:
    """Give the calling thread its threads back (a server embedded in a longer process)."""
    if _default is not None:
        torch.set_num_threads(_default)


def model_thread_count(requested: int = 0) -> int:
    """``requested`` (> 0), else the process's default count (recorded by ``reserve_for_model``)."""
    if requested > 0:
        return requested
    return _default if _default is not None else torch.get_num_threads()


def enter_model_thread(threads: int) -> None:
    """Called first in the model thread: its ops run on ``threads`` threads."""
    if threads > 0:
        torch.set_num_threads(threads)
