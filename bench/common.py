"""What the bench scripts share: where the repo and its results are, the CPU's name, a
result's figures written out, a server to measure."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def cpu_name(default: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo; else ``default`` (else the platform's word)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default if default is not None else platform.processor() or platform.machine()


def write_json(directory: Path, name: str, data: Any, indent: int = 2) -> None:
    """``directory/name.json``, indented, a newline at the end: written before the result's
    ``.md`` is put together, so that a report that fails still leaves its figures."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_name(f".{name}.json.{os.getpid()}")  # whole or not at all, one writer or two
    tmp.write_text(json.dumps(data, indent=indent) + "\n")
    os.replace(tmp, path)


def publish(
    directory: Path, name: str, results: dict[str, Any], report: Callable[[dict[str, Any]], str]
) -> None:
    """A bench's results as ``directory/name.json`` (first: a report that fails still leaves
    its figures) and ``name.md`` (``report`` of them), the report printed too."""
    write_json(directory, name, results)
    text = report(results)
    (directory / f"{name}.md").write_text(text)
    print(text)


def run_header(module: str, machine: dict[str, Any], note: str = "") -> dict[str, Any]:
    """A result's first keys, which ``run_lines`` reports: the command that produced it
    (``python -m <module>`` and this process's arguments, plus ``note``), its date (UTC) and
    ``machine``."""
    return {
        "command": " ".join([f"python -m {module}", *sys.argv[1:]]) + note,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine,
    }


def run_lines(results: dict[str, Any]) -> list[str]:
    """A report's lines on how it was run: its command and date, then its machine."""
    machine = ", ".join(f"{k} {v}" for k, v in results["machine"].items())
    return [f"Command: `{results['command']}` — {results['date']}", "", f"Machine: {machine}", ""]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``rankone serve`` in a child process on 127.0.0.1, for a benchmark: ``env`` on top of
    this process's environment (the repo on PYTHONPATH), its output in ``log`` (else
    inherited); ``start`` returns once ``/readyz`` answers 200 (``ready_s``: how long that
    took), or raises with the log's tail if the server exits or is not ready in ``timeout``."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path | None = None,
        port: int | None = None,
        *,
        cmd: list[str] | None = None,
        ready: str = "/readyz",
    ) -> None:
        """``cmd``: another server to run the same way (``{port}`` in it is replaced by the
        port), ready when ``ready`` answers 200 (a peer engine's server, e.g. llama-server)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.log = log
        self.cmd = cmd
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_s = 0.0

    def start(self, timeout: float = 300.0) -> Server:
        if self.cmd is not None:
            cmd = [a.replace("{port}", str(self.port)) for a in self.cmd]
        else:
            cmd = [sys.executable, "-m", "rankone_cli", "serve"]
            cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        out = self.log.open("ab") if self.log is not None else None
        started = time.perf_counter()
        err = subprocess.STDOUT if out is not None else None
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}){self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}{self.ready}", timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.perf_counter() - started
                        return self
            except OSError:  # not listening yet, or 503 while it loads
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s{self._tail()}")

    def _tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return ":\n" + self.log.read_text(errors="replace")[-3000:]

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Server:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
