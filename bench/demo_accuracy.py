"""Exact match of every demo task, asked through the HTTP API of a running rankone server.

Either point it at a running server (``--url``, e.g. the one ``rankone demo`` started) or let
it start one itself on a free port from the demo cache (``.rankone/demo``, built by
``rankone demo --no-serve``). Each task's held-out test examples are sent to
``POST /v1/tasks/<task>/generate`` (greedy, batched as lists of inputs) and compared with the
targets. Writes ``bench/results/demo_accuracy.{md,json}``.

    python -m bench.demo_accuracy [--url http://127.0.0.1:8000] [--limit 100]
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"demo_accuracy: {url} → HTTP {e.code}: {e.read()[:500]!r}") from None


def get(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def start_server(cache: Path, port: int) -> subprocess.Popen:
    from trainer import demo_cli

    env = demo_cli.server_env(demo_cli.DemoPaths(cache), port)
    return subprocess.Popen([sys.executable, "-m", "rankone_cli", "serve"], env=env)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"demo_accuracy: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"demo_accuracy: {url} not ready after {timeout:.0f}s")


def measure(
    url: str, data: Path, tasks: list[str], limit: int, batch: int, max_new_tokens: int
) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for task in tasks:
        rows = read_jsonl(data / task / "test.jsonl")[:limit]
        hits, misses = 0, []
        start = time.monotonic()
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            res = post(
                f"{url}/v1/tasks/{task}/generate",
                {
                    "inputs": [r["input"] for r in chunk],
                    "parameters": {"max_new_tokens": max_new_tokens, "temperature": 0},
                },
            )
            for row, text in zip(chunk, res["texts"], strict=True):
                if text.strip() == row["target"]:
                    hits += 1
                elif len(misses) < 5:
                    misses.append({"input": row["input"], "target": row["target"], "got": text})
        out[task] = {
            "exact_match": hits / max(1, len(rows)),
            "n": len(rows),
            "seconds": round(time.monotonic() - start, 2),
            "misses": misses,
        }
        print(f"{task:>12}: {out[task]['exact_match']:.1%} of {len(rows)}", flush=True)
    return out


def markdown(report: dict) -> str:
    lines = [
        "# Demo accuracy through the HTTP API",
        "",
        "Exact match of each demo task on its held-out test examples, asked through "
        "`POST /v1/tasks/<task>/generate` (greedy) of a running `rankone serve` with the demo "
        "artifacts (`rankone demo`). Target: ≥ 90% per task.",
        "",
        f"Command: `{report['command']}`  ",
        f"Server: {report['url']} ({report['backbone']})  ",
        f"Machine: {report['machine']}",
        "",
        "| task | exact match | examples | ≥ 90% |",
        "|---|---|---|---|",
    ]
    for task, r in report["tasks"].items():
        ok = "yes" if r["exact_match"] >= 0.9 else "**no**"
        lines.append(f"| {task} | {r['exact_match']:.1%} | {r['n']} | {ok} |")
    lines += ["", f"Mean: {report['mean_exact_match']:.1%}", ""]
    bad = {t: r["misses"] for t, r in report["tasks"].items() if r["misses"]}
    if bad:
        lines += ["Some misses (input → target / got):", ""]
        for task, misses in bad.items():
            shown = "; ".join(
                f"`{m['input']}` → `{m['target']}` / `{m['got']}`" for m in misses[:3]
            )
            lines.append(f"- {task}: {shown}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="a running server; default: start one from --cache")
    p.add_argument("--cache", type=Path, default=Path(".rankone/demo"))
    p.add_argument("--data", type=Path, help="task data (default: <cache>/data)")
    p.add_argument("--tasks", nargs="*", help="default: every task the demo built")
    p.add_argument("--limit", type=int, default=100, help="test examples per task")
    p.add_argument("--batch", type=int, default=32, help="inputs per request")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    data = args.data or args.cache / "data"
    tasks = args.tasks
    if not tasks:
        manifest = json.loads((args.cache / "demo.json").read_text())
        tasks = manifest["recipe"]["tasks"]
    proc = None
    url = args.url
    if url is None:
        url = f"http://127.0.0.1:{free_port()}"
        proc = start_server(args.cache, int(url.rsplit(":", 1)[1]))
    try:
        wait_ready(url, proc)
        try:
            info = get(f"{url}/v1/info")
            bb = info.get("backbone", info)
            bb = bb if isinstance(bb, dict) else {"fingerprint": bb}
            backbone = ", ".join(
                f"{k} {bb[k]}" for k in ("fingerprint", "kind", "d", "dtype", "device") if k in bb
            )
        except (urllib.error.URLError, OSError, ValueError):
            backbone = "?"
        results = measure(url, data, tasks, args.limit, args.batch, args.max_new_tokens)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    mean = sum(r["exact_match"] for r in results.values()) / max(1, len(results))
    report = {
        "url": url if args.url else "a server started by the benchmark (demo cache)",
        "backbone": backbone,
        "tasks": results,
        "mean_exact_match": mean,
        "command": "python -m bench.demo_accuracy " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "demo_accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.results / "demo_accuracy.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(r["exact_match"] >= 0.9 for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
