"""Embedded mode's worker: one ``rankone worker`` child process of the server.

Started at the first queued job (a server never asked to fine-tune pays nothing), started
again whenever a job is queued or running and the child is gone (the job reaper checks every
few seconds), stopped with the server. It is an ordinary worker: it
loads its own copy of the backbone and talks to this server over HTTP with an admin key passed
in its environment (not on its command line, where ``ps`` would show it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from service.auth import parse_entries
from service.settings import Settings

log = logging.getLogger("rankone.jobs")
ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_S = 10.0
RESTART_EVERY_S = 5.0


class LocalWorker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = -math.inf

    @property
    def url(self) -> str:
        host = self.settings.host
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.settings.port}"

    async def ensure_running(self) -> None:
        """Start the worker unless it runs (called at each queued job and by the job reaper);
        one that keeps dying is started again at most every ``RESTART_EVERY_S``."""
        if self.proc is not None and self.proc.poll() is None:
            return
        if time.monotonic() - self.started_at < RESTART_EVERY_S:
            return
        if self.proc is not None:
            log.warning(
                "the embedded fine-tuning worker exited (%s); starting it again",
                self.proc.returncode,
            )
        s = self.settings
        cmd = [
            sys.executable, "-m", "rankone_cli", "worker",
            "--url", self.url, "--model", s.model, "--device", s.device,
            "--name", f"embedded-{os.getpid()}", "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        unscoped = [e.key for e in parse_entries(tuple(s.admin_keys)) if e.patterns is None]
        if s.admin_keys and not unscoped:
            log.error("the embedded fine-tuning worker needs an unscoped admin key; none is set")
            return
        if unscoped:
            env["RANKONE_WORKER_KEY"] = unscoped[0]
        self.started_at = time.monotonic()
        self.proc = await asyncio.to_thread(subprocess.Popen, cmd, cwd=ROOT, env=env)
        log.info("started the embedded fine-tuning worker", extra={"pid": self.proc.pid})

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
