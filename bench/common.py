"""What the bench scripts share: where the repo and its results are, the CPU's name, a
result's figures written out."""

from __future__ import annotations

import json
import platform
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
    (directory / f"{name}.json").write_text(json.dumps(data, indent=indent) + "\n")


def run_lines(results: dict[str, Any]) -> list[str]:
    """A report's lines on how it was run: its command and date, then its machine."""
    machine = ", ".join(f"{k} {v}" for k, v in results["machine"].items())
    return [f"Command: `{results['command']}` — {results['date']}", "", f"Machine: {machine}", ""]
