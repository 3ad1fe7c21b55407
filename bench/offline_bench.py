"""Offline benchmark of the trainer: held-out target tasks, few-shot and full data.

On the demo backbone (``rankone demo --no-serve`` builds it, with the MPT source training on
the demo source tasks), for every held-out TARGET task (formats the backbone never saw in
pretraining) and for k = 32 shots and for the full training set, exact match on the test split
of:

- no prompt (the bare backbone),
- PT: plain prompt tuning of the target task (``teach``), L·d parameters per task,
- MPT factors-only: ``adapt`` with P frozen, (L + d)·r parameters per task,
- MPT paper mode: ``adapt --train-shared`` (P fine-tuned too), L·d + (L + d)·r per task.

Training goes through the trainer's CLI stages (``python -m trainer ...``); exact match is
measured the way the server computes (``trainer.demo.evaluate``: compose P ⊙ (U @ V), prepend,
greedy decode). Writes ``bench/results/offline.{md,json,png}``.

    python -m bench.offline_bench [--steps 100] [--full-steps 200] [--tasks ...]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS, cpu_name, write_json
from trainer.demo.evaluate import evaluate_artifacts
from trainer.demo.tasks import TARGET_TASKS, write_task_data

METHODS = ["no prompt", "PT", "MPT factors-only", "MPT paper"]


def machine() -> str:
    cpu = cpu_name(platform.processor() or "unknown CPU")
    import os

    return (
        f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs "
        f"(1-minute load average {os.getloadavg()[0]:.1f} when written), torch "
        f"{torch.__version__} CPU, Python "
        f"{platform.python_version()}"
    )


def stage(name: str, *args: str, log: Path) -> float:
    cmd = [sys.executable, "-m", "trainer", name, *args]
    print("$", shlex.join(cmd[1:]), flush=True)
    start = time.monotonic()
    with log.open("a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"offline_bench: {name} failed (exit {proc.returncode}); see {log}")
    return time.monotonic() - start


def source_shape(source: Path) -> tuple[int, int, int]:
    from prompts import load_artifact_dir

    art = load_artifact_dir(source)
    tf = next(iter(art.tasks.values()))
    return tf.length, tf.dim, tf.rank


def plot(results: dict, settings: list[str], tasks: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    width = 0.8 / len(METHODS)
    for ax, setting in zip(axes[0], settings, strict=True):
        labels = [*tasks, "mean"]
        for m, method in enumerate(METHODS):
            ems = results[setting][method]
            values = [ems.get(t, 0.0) * 100 for t in tasks]
            values.append(sum(values) / max(1, len(values)))
            xs = [i + (m - (len(METHODS) - 1) / 2) * width for i in range(len(labels))]
            ax.bar(xs, values, width, label=method)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("exact match (%)")
        ax.set_title(setting)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("held-out target tasks on the demo backbone")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    tasks = report["tasks"]
    lines = [
        "# Offline benchmark: held-out target tasks (MPT vs PT vs no prompt)",
        "",
        f"Backbone: the demo backbone (`{report['model']}`, d = {report['d']}), "
        f"pretrained from scratch by `pretrain-demo` on the source task family; the target "
        "task formats below never occur in its pretraining. MPT source training: "
        f"`{report['source']}` (L = {report['L']}, r = {report['r']}).",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}. Wall time: {report['wall_seconds'] / 60:.1f} min.",
        "",
        "Steps: " + report["steps_note"],
        "",
        "Exact match on each task's test split "
        f"({report['n_test']} examples), greedy decoding, prompts composed as served.",
        "",
    ]
    for setting in report["settings"]:
        lines += [f"## {setting}", ""]
        lines.append("| method | " + " | ".join(tasks) + " | mean |")
        lines.append("|---|" + "---|" * (len(tasks) + 1))
        for method in METHODS:
            ems = report["results"][setting][method]
            vals = [ems.get(t) for t in tasks]
            mean = sum(v for v in vals if v is not None) / max(1, len(vals))
            cells = ["–" if v is None else f"{v:.0%}" for v in vals]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {mean:.1%} |")
        lines.append("")
    p = report["params"]
    lines += [
        "## Parameters learned per task",
        "",
        "| method | per task | formula |",
        "|---|---|---|",
        "| no prompt | 0 | – |",
        f"| PT | {p['PT']:,} | L·d |",
        f"| MPT factors-only | {p['MPT factors-only']:,} | (L + d)·r |",
        f"| MPT paper | {p['MPT paper']:,} | L·d + (L + d)·r |",
        "",
        f"(L = {report['L']}, d = {report['d']}, r = {report['r']}.) "
        "Factors-only tasks share the already-served source prompt P; a paper-mode task "
        "brings its own fine-tuned P.",
        "",
        "![offline](offline.png)",
        "",
    ]
    if report.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(".rankone/demo/backbone"))
    p.add_argument(
        "--source",
        type=Path,
        default=Path(".rankone/demo/runs/distill"),
        help="output of `distill` on the source tasks (the demo's)",
    )
    p.add_argument("--tasks", nargs="+", default=list(TARGET_TASKS))
    p.add_argument("--work", type=Path, default=Path("/tmp/rankone-offline-bench"))
    p.add_argument("--shots", type=int, default=32)
    p.add_argument("--n-train", type=int, default=1000, help="full-data training set size")
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps, few-shot")
    p.add_argument("--full-steps", type=int, default=200, help="optimizer steps, full data")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--notes", nargs="*", default=[])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    start = time.monotonic()
    L, d, r = source_shape(args.source)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "stages.log"
    data = args.work / "data"
    write_task_data(data, args.tasks, args.n_train, 50, args.n_test, seed=args.seed + 1)
    common = [
        "--model",
        str(args.model),
        "--data-dir",
        str(data),
        "--tasks",
        *args.tasks,
        "--prompt-length",
        str(L),
        "--rank",
        str(r),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--no-progress",
        "--device",
        "cpu",
    ]
    settings = {
        f"k = {args.shots} shots": (["--shots", str(args.shots)], args.steps),
        f"full data ({args.n_train} examples)": ([], args.full_steps),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    timings: dict[str, dict[str, float]] = {}
    bare = evaluate_artifacts(args.model, None, data, args.tasks)
    for i, (setting, (shots, steps)) in enumerate(settings.items()):
        out = args.work / f"s{i}"
        run = [*common, *shots, "--steps", str(steps)]
        timings[setting] = {
            "PT": stage("teach", *run, "--out", str(out / "pt"), log=log),
            "MPT factors-only": stage(
                "adapt", *run, "--source", str(args.source), "--out", str(out / "fo"), log=log
            ),
            "MPT paper": stage(
                "adapt",
                *run,
                "--source",
                str(args.source),
                "--train-shared",
                "--out",
                str(out / "paper"),
                log=log,
            ),
        }
        results[setting] = {"no prompt": bare}
        for method, sub in [("PT", "pt"), ("MPT factors-only", "fo"), ("MPT paper", "paper")]:
            results[setting][method] = evaluate_artifacts(args.model, out / sub, data, args.tasks)
            print(setting, method, results[setting][method], flush=True)

    report = {
        "tasks": args.tasks,
        "settings": list(settings),
        "results": results,
        "stage_seconds": timings,
        "L": L,
        "d": d,
        "r": r,
        "params": {"PT": L * d, "MPT factors-only": (L + d) * r, "MPT paper": L * d + (L + d) * r},
        "model": str(args.model),
        "source": str(args.source),
        "n_test": args.n_test,
        "command": "python -m bench.offline_bench " + shlex.join(argv or sys.argv[1:]),
        "machine": machine(),
        "wall_seconds": round(time.monotonic() - start, 1),
        "steps_note": f"{args.steps} optimizer steps few-shot, {args.full_steps} full data, "
        f"batch {args.batch_size}, lr {args.lr} (AdamW, linear decay) for every "
        "trained method.",
        "notes": args.notes,
    }
    write_json(args.results, "offline", report)
    plot(results, list(settings), args.tasks, args.results / "offline.png")
    (args.results / "offline.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
