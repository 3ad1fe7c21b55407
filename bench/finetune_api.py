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

from bench.common import RESULTS, ROOT, Server
from bench.offline_bench import machine
from client import Client
from prompts import decode_task, from_base64
from trainer.demo.tasks import read_jsonl, write_task_data

KEY = "bench-admin"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=ROOT / ".rankone" / "demo")
    p.add_argument("--model", help="backbone (default: the demo's); a .gguf file works")
    p.add_argument(
        "--source", type=Path, help="MPT source run to adapt from (default: the demo's distill)"
    )
    p.add_argument(
        "--new-shared",
        type=int,
        metavar="L",
        help="no source run: a fresh shared prompt of L random vocabulary embeddings, "
        "registered as it is (tasks start from U@V = 1)",
    )
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--n-test", type=int, default=100, help="test examples scored")
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


def server(args: argparse.Namespace, log: Path) -> Server:
    env = {
        "RANKONE_MODEL": args.model,
        "RANKONE_SEED_DIR": str(args.source),
        "RANKONE_DATA_DIR": str(args.work / "store"),
        "RANKONE_ADMIN_KEYS": KEY,
        "RANKONE_FINETUNE_BASE_LR": str(args.lr),
        "RANKONE_LOG_LEVEL": "WARNING",
    }
    return Server(env, log).start(timeout=180)


def fresh_shared(args: argparse.Namespace) -> None:
    """``<work>/source/shared/base.safetensors``: L random vocabulary embeddings of the model."""
    import torch

    from prompts import SharedPrompt, load_backbone, save_shared

    backbone = load_backbone(args.model)
    table = backbone.model.get_input_embeddings().weight.detach().float()  # type: ignore[operator]
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, min(5000, table.shape[0]), (args.new_shared,), generator=g)
    save_shared(args.source, SharedPrompt("base", table[ids].clone(), backbone.fingerprint))


def exact_match(c: Client, task: str, rows: list[dict[str, str]], max_new: int) -> float:
    hits = 0
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        inputs = [r["input"] for r in chunk]
        texts = c.generate(task, inputs, max_new_tokens=max_new, temperature=0).texts
        hits += sum(t.strip() == r["target"].strip() for t, r in zip(texts, chunk, strict=True))
    return hits / len(rows)


def api_jobs(
    c: Client, args: argparse.Namespace, data: Path, test: list[dict[str, str]]
) -> list[dict[str, Any]]:
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
            rankone={"shots": args.shots, "replace": i > 0, "mode": "factors-only"},
        )
        job = c.fine_tuning.jobs.wait(job["id"], timeout=1800, poll_s=0.2)
        elapsed = time.perf_counter() - t0
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['id']} {job['status']}: {job['error']}")
        runs.append(
            {
                "job": job["id"],
                "seconds": elapsed,
                "metrics": job["rankone"]["metrics"],
                "exact_match": exact_match(c, args.task, test, args.max_new_tokens),
            }
        )
    return runs


def cli_run(args: argparse.Namespace, data: Path, c: Client) -> dict[str, Any]:
    out = args.work / "cli"
    cmd = [
        sys.executable, "-m", "trainer", "adapt",
        "--model", args.model, "--data-dir", str(data), "--tasks", args.task,
        "--source", str(args.source), "--out", str(out),
        "--shots", str(args.shots), "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
        "--no-progress", "--device", "cpu",
        *(["--factor-init", "ones"] if args.new_shared else []),
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
    args.model = args.model or str(args.demo / "backbone")
    if args.new_shared:
        args.source = args.work / "source"
        fresh_shared(args)
    args.source = args.source or args.demo / "runs" / "distill"
    (shared,) = (args.source / "shared").glob("*.safetensors")
    args.shared = shared.stem
    data = args.work / "data"
    write_task_data(data, [args.task], 1000, 100, args.n_test, seed=args.seed)
    test = read_jsonl(data / args.task / "test.jsonl")
    started = time.perf_counter()
    running = server(args, args.work / "server.log")
    with running, Client(running.url, KEY, timeout=300) as c:
        api = api_jobs(c, args, data, test)  # first: only the source tasks are registered
        cli = cli_run(args, data, c)
        cli_acc = exact_match(c, f"{args.task}-cli", test, args.max_new_tokens)
        served = decode_task(
            from_base64(c.tasks.get(args.task, include_factors=True).factors or "")
        )
        local = decode_task(cli.pop("blob"))
        diff = float(
            (served.u - local.u).abs().max().item() + (served.v - local.v).abs().max().item()
        )
    report = {
        "command": "python -m bench.finetune_api " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "api": api,
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
        f"{100 * run['exact_match']:.0f}% |"
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
            f"Backbone: `{args.model}`; source: `{args.source}` (shared prompt `{args.shared}`"
            + (", fresh: no source tasks, factors start from U@V = 1" if args.new_shared else "")
            + f"). Task: `{args.task}` (a demo target task), k = {args.shots} shots, {args.steps} "
            f"steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}, factors-only.",
            "",
            f"| path | POST / command → servable task | of which training | exact match (test, {args.n_test}) |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Max |Δ| between the API task's factors and the CLI's (u and v): "
            f"{r['factor_max_abs_diff']:.2e} — the worker runs the trainer's own adapt stage "
            "with the same data, init ("
            + ("U@V = 1" if args.new_shared else "the source tasks' average")
            + "), seed and schedule. 'Of which training' is the worker's adapt stage (data, "
            "training, validation, artifacts, loss plot) for the API rows; for the CLI, the whole "
            "`trainer adapt` process (interpreter start and backbone load included).",
            "",
            "Exact match is measured through the server for both tasks "
            f"(`POST /v1/tasks/{{task}}/generate`, greedy, {args.max_new_tokens} new tokens).",
            "",
        ]
    )


if __name__ == "__main__":
    main()
