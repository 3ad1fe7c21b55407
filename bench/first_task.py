"""The figures of docs/first-task.md: its blocks run as written against the demo's server.

Points at a running server (``--url``: the demo's) or starts one itself on a free port from
the demo cache (``rankone demo --no-serve`` builds it), with a throw-away store. Runs the page's
``bash`` blocks between the walkthrough markers, in order, in a temporary folder: the examples,
the fine-tuning job through the ``openai`` client, and the comparison on the held-out nouns
(the task, the base model given the noun alone, the base model given a written instruction).
The rankone-commands block (step 4) is left out: it trains the same task a second time. Writes
``bench/results/first_task.md`` and ``.json`` (the scores, the job's wall time and events, the
machine and its load).

    python -m bench.first_task [--cache .rankone/demo-smollm2] [--url URL]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, write_json
from bench.demo_accuracy import demo_server

PAGE = ROOT / "docs" / "first-task.md"
START, END = "<!-- walkthrough:start -->", "<!-- walkthrough:end -->"


def walkthrough_blocks(page: Path = PAGE) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block between the walkthrough markers."""
    text = page.read_text()
    section = text[text.index(START) : text.index(END)]
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, flags=re.S | re.M)


def scores(output: str) -> dict[str, str]:
    """The comparison block's last line: ``{'task': '17/20', 'base': '0/20', ...}``."""
    line = next(x for x in reversed(output.splitlines()) if x.startswith("{'task'"))
    found: dict[str, str] = ast.literal_eval(line)
    return found


def run(url: str) -> dict[str, Any]:
    bash = [body for kind, body in walkthrough_blocks() if kind == "bash"]
    steps = {"examples": bash[1], "fine-tune": bash[2], "compare": bash[3]}
    # the page's blocks run in the activated venv (its step 1): this interpreter's bin first
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RANKONE_URL": url, "RANKONE_KEY": "unused"}
    out: dict[str, Any] = {"seconds": {}}
    with tempfile.TemporaryDirectory(prefix="rankone-first-task-") as work:
        for name, script in steps.items():
            start = time.monotonic()
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise SystemExit(
                    f"the page's {name!r} block failed (exit {done.returncode}):\n"
                    f"{done.stdout}\n{done.stderr}"
                )
            out["seconds"][name] = round(time.monotonic() - start, 1)
            out[name] = done.stdout
            print(done.stdout, flush=True)
    out["scores"] = scores(out["compare"])
    return out


def report(result: dict[str, Any]) -> str:
    s, secs = result["scores"], result["seconds"]
    load = result["machine"]["load_average"]
    won = [x for x in result["fine-tune"].splitlines() if " won: " in x and x.startswith("search:")]
    note = result.get("note") or "nothing else was said about the machine's other work"
    return "\n".join(
        [
            "| held-out nouns, exact match | task `plural` | base model, noun alone "
            "| base model + written instruction |",
            "|---|---|---|---|",
            f"| {result['date']} | **{s['task']}** | {s['base']} | {s['base + instruction']} |",
            "",
            f"The job (upload, queue, the search, the winner's final training, registration) "
            f"took {secs['fine-tune']:.0f} s of wall time on {result['machine']['cpus']} CPU "
            f"cores, load average {load[0]:.1f} at the start ({note}).",
            "",
            f"The job's choice: {won[-1].removeprefix('search: ') if won else '(not found)'}",
            "",
            "Command: `python -m bench.first_task`",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path(".rankone/demo-smollm2"))
    p.add_argument("--url", help="a running demo server (default: start one on the cache)")
    p.add_argument("--note", default="", help="what else the machine ran (kept in the report)")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the .md from the .json (and --note)"
    )
    args = p.parse_args(argv)
    if args.report_only:
        result = json.loads((RESULTS / "first_task.json").read_text())
        result["note"] = args.note or result.get("note", "")
        write_json(RESULTS, "first_task", result)
        (RESULTS / "first_task.md").write_text(report(result) + "\n")
        return 0
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()),
    }
    with tempfile.TemporaryDirectory(prefix="rankone-first-task-store-") as store:
        if args.url:
            result = run(args.url)
        else:
            with demo_server(args.cache, Path(store)) as running:
                result = run(running.url)
    result.update(date=time.strftime("%Y-%m-%d"), machine=machine, note=args.note)
    write_json(RESULTS, "first_task", result)
    (RESULTS / "first_task.md").write_text(report(result) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
