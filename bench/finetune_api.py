"""Fine-tuning through the API vs the CLI: time to a servable task and its accuracy.

On the demo backbone (``rankone demo --no-serve`` builds ``.rankone/demo``), one held-out
target task, the same factors-only adaptation two ways:

- **API**: ``rankone serve`` (embedded store seeded with the demo's MPT source run, its own
  worker child), the task's files uploaded, ``POST /v1/fine_tuning/jobs``, polled until it
  succeeded: from the POST to a task every replica serves. The first job includes starting
  the worker (process start + backbone load); later jobs (``rankone.replace``, a new version
  each) find it warm.
- **CLI**: ``python -m trainer adapt --source <distill run>`` with the same options, then the
  result registered through the client (``POST /v1/tasks``): from the command to a servable
  task.

Both tasks are then scored the same way through the server (``/v1/tasks/{task}/generate``,
greedy) on the test split, and their factors compared. Writes
``bench/results/finetune_api.{md,json}``.

    python -m bench.finetune_api [--demo .rankone/demo] [--task count-consonants] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.offline_bench import machine
from client import Client
from prompts import decode_task, from_base64
from tests.redis_server import free_port
from trainer.demo.tasks import read_jsonl, write_task_data

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-admin"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=ROOT / ".rankone" / "demo")
    p.add_argument("--task", default="count-consonants")
    p.add_argument("--shots", type=int, default=32)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="API jobs in a row (the first is cold)")
    p.add_argument("--work", type=Path, default=Path("/tmp/rankone-finetune-bench"))
    p.add_argument("--out", type=Path, default=RESULTS / "finetune_api")
    return p.parse_args()


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RANKONE_MODEL": str(args.demo / "backbone"),
        "RANKONE_SEED_DIR": str(args.demo / "runs" / "distill"),
        "RANKONE_DATA_DIR": str(args.work / "store"),
        "RANKONE_ADMIN_KEYS": KEY,
        "RANKONE_FINETUNE_BASE_LR": str(args.lr),
        "RANKONE_LOG_LEVEL": "WARNING",
    }
    cmd = [sys.executable, "-m", "rankone_cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    with Client(url, KEY) as c:
        deadline = time.monotonic() + 180
        while not c.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; see {log}")
            time.sleep(0.3)
    return proc, url


def exact_match(c: Client, task: str, rows: list[dict[str, str]]) -> float:
    hits = 0
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        texts = c.generate(
            task, [r["input"] for r in chunk], max_new_tokens=16, temperature=0
        ).texts
        hits += sum(t.strip() == r["target"].strip() for t, r in zip(texts, chunk, strict=True))
    return hits / len(rows)


def api_jobs(c: Client, args: argparse.Namespace, data: Path) -> list[dict[str, Any]]:
    train = c.files.create(data / args.task / "train.jsonl")
    valid = c.files.create(data / args.task / "validation.jsonl")
    runs = []
    for i in range(args.jobs):
        t0 = time.perf_counter()
        job = c.fine_tuning.jobs.create(
            args.shared,
            train["id"],
            validation_file=valid["id"],
            suffix=args.task,
            hyperparameters={"steps": args.steps, "batch_size": args.batch_size},
            seed=args.seed,
            rankone={"shots": args.shots, "replace": i > 0},
        )
        job = c.fine_tuning.jobs.wait(job["id"], timeout=1800, poll_s=0.2)
        elapsed = time.perf_counter() - t0
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['id']} {job['status']}: {job['error']}")
        runs.append({"job": job["id"], "seconds": elapsed, "metrics": job["rankone"]["metrics"]})
    return runs


def cli_run(args: argparse.Namespace, data: Path, c: Client) -> dict[str, Any]:
    out = args.work / "cli"
    cmd = [
        sys.executable, "-m", "trainer", "adapt",
        "--model", str(args.demo / "backbone"), "--data-dir", str(data), "--tasks", args.task,
        "--source", str(args.demo / "runs" / "distill"), "--out", str(out),
        "--shots", str(args.shots), "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
        "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    print("$", shlex.join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    trained = time.perf_counter() - t0
    blob = (out / "tasks" / f"{args.task}.safetensors").read_bytes()
    c.tasks.create(f"{args.task}-cli", factors=blob)
    return {"seconds": time.perf_counter() - t0, "train_process_seconds": trained, "blob": blob}


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    (shared,) = (args.demo / "runs" / "distill" / "shared").glob("*.safetensors")
    args.shared = shared.stem
    data = args.work / "data"
    write_task_data(data, [args.task], 1000, 100, 100, seed=args.seed)
    test = read_jsonl(data / args.task / "test.jsonl")
    started = time.perf_counter()
    proc, url = start_server(args, args.work / "server.log")
    try:
        with Client(url, KEY, timeout=300) as c:
            api = api_jobs(c, args, data)  # first: only the source tasks are registered
            api_acc = exact_match(c, args.task, test)
            cli = cli_run(args, data, c)
            cli_acc = exact_match(c, f"{args.task}-cli", test)
            served = decode_task(
                from_base64(c.tasks.get(args.task, include_factors=True).factors or "")
            )
            local = decode_task(cli.pop("blob"))
            diff = float(
                (served.u - local.u).abs().max().item() + (served.v - local.v).abs().max().item()
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    report = {
        "command": "python -m bench.finetune_api " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "api": api,
        "api_exact_match": api_acc,
        "cli": cli,
        "cli_exact_match": cli_acc,
        "factor_max_abs_diff": diff,
        "wall_s": time.perf_counter() - started,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report, args))
    print(markdown(report, args))


def markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [
        f"| API job {i + 1} ({'cold: starts the worker' if i == 0 else 'warm worker'}) | "
        f"{run['seconds']:.1f} s | {run['metrics']['train_seconds']:.1f} s | "
        f"{100 * r['api_exact_match']:.0f}% |"
        for i, run in enumerate(r["api"])
    ]
    rows.append(
        f"| CLI `trainer adapt` + `POST /v1/tasks` | {r['cli']['seconds']:.1f} s | "
        f"{r['cli']['train_process_seconds']:.1f} s (whole process) | {100 * r['cli_exact_match']:.0f}% |"
    )
    return "\n".join(
        [
            "# Fine-tuning through the API vs the CLI",
            "",
            f"Command: `{r['command']}`",
            "",
            f"Machine: {r['machine']}. Other developers' jobs ran at the same time: the seconds are "
            "noisy; compare the rows, measured one after the other in one run.",
            "",
            f"Backbone: the demo backbone (`{args.demo}/backbone`); source: the demo's MPT run "
            f"(`{args.demo}/runs/distill`, shared prompt `{args.shared}`). Task: `{args.task}` (held out: "
            f"the backbone never saw it in pretraining), k = {args.shots} shots, {args.steps} "
            f"steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}, factors-only.",
            "",
            "| path | POST / command → servable task | of which training | exact match (test, 100) |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Max |Δ| between the API task's factors and the CLI's (u and v): "
            f"{r['factor_max_abs_diff']:.2e} — the worker runs the trainer's own adapt stage "
            "with the same data, init (the source tasks' average), seed and schedule.",
            "",
            "Exact match is measured through the server for both tasks "
            "(`POST /v1/tasks/{task}/generate`, greedy, 16 new tokens).",
            "",
        ]
    )


if __name__ == "__main__":
    main()
