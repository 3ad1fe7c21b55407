"""A shutdown step that never returns is left behind after its bound, not waited on forever."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.app import bounded


async def _stuck() -> None:
    """A close waiting on something that never comes (a pool's lock, a dead peer)."""
    await asyncio.Event().wait()


def test_a_step_that_never_returns_is_left_behind(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> float:
        start = time.monotonic()
        await bounded("a stuck close", _stuck(), seconds=0.2)
        return time.monotonic() - start

    assert asyncio.run(main()) < 5
    assert "a stuck close did not finish" in caplog.text


def test_a_step_that_fails_still_raises() -> None:
    async def broken() -> None:
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        asyncio.run(bounded("a broken close", broken(), seconds=1))
