"""Does the CPU preset's step cap bind? The same runs as the sweep's, twice as long.

    nice -n 10 python -m bench.task_quality.horizon [--target capital] [--steps 80]

Nearly every sweep run of ``bench.task_quality``'s cpu preset keeps its last step (40 at
k = 32) as its best on validation: the cap, not validation, ends it. This trains each method
at the lr the sweep chose for ``--target`` (k = 32, seed 0, the same rows, init and
validation) for ``--steps`` instead, and reports the best step, validation loss and test
exact match beside the sweep's, so the next sessions know whether the benchmark's horizon
changes its ranking before spending hours on it. Runs are kept under
``.rankone/task_quality-horizon/`` (resumable); writes bench/results/task_quality_horizon.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, write_json
from bench.task_quality.__main__ import Bench
from bench.task_quality.presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="capital")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--source", type=Path, default=ROOT / ".rankone/demo-smollm2/artifacts")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--sweep-state", type=Path, default=None, help="the benchmark's --state")
    ap.add_argument("--state", type=Path, default=None, help="these runs' (resumable)")
    args = ap.parse_args(argv)
    args.command = " ".join(["python -m bench.task_quality.horizon", *(argv or sys.argv[1:])])
    base = PRESETS[args.preset]
    k = base.sweep_k
    swept = Bench.__new__(Bench)  # the sweep's runs: read from its state, nothing trained
    swept.preset = base
    swept.state = args.sweep_state or ROOT / ".rankone" / f"task_quality-{base.name}"
    model = args.model
    if model is None:
        from prompts import smollm2_gguf_path

        model = str(smollm2_gguf_path())
    long = replace(base, steps={**base.steps, k: args.steps})
    state = args.state or ROOT / ".rankone" / f"task_quality-horizon-{base.name}"
    bench = Bench(long, state, args.source, model)
    rows: dict[str, Any] = {}
    for method in base.methods:
        lr = swept.chosen_lr(method, args.target)
        if lr is None:
            print(f"[horizon] {method}: the sweep on {args.target} is not complete", flush=True)
            continue
        short = swept.load(swept.sweep_key(method, args.target, lr))
        key = f"horizon-{method}-{args.target}-k{k}-s0-lr{lr:g}-steps{args.steps}"
        got = bench.do(key, bench.run_method, method, args.target, int(k), 0, lr)
        rows[method] = {"lr": lr, f"steps_{base.steps[k]}": short, f"steps_{args.steps}": got}
        write(args, base.steps[k], k, bench.source_sha, rows)  # after each: a stop keeps them
    return 0


def write(args: argparse.Namespace, short: int, k: str, sha: str, rows: dict[str, Any]) -> None:
    result = {
        "command": args.command,
        "target": args.target,
        "k": k,
        "seed": 0,
        "steps": [short, args.steps],
        "source_sha": sha,
        "methods": rows,
    }
    write_json(args.out, "task_quality_horizon", result, indent=1)
    (args.out / "task_quality_horizon.md").write_text(markdown(result))
    print(markdown(result), flush=True)


def markdown(r: dict[str, Any]) -> str:
    short, long = r["steps"]
    lines = [
        f"# Does the step cap bind? {r['target']}, k = {r['k']}, seed 0: {short} vs {long} steps",
        "",
        f"Command: `{r['command']}`. Each method at the lr the sweep chose (lowest validation "
        "loss), same rows and init; best step on validation loss (every 5 steps), test exact "
        "match on 60 rows at that step.",
        "",
        f"| method | lr | best step / {short} | val loss | test EM | best step / {long} | "
        "val loss | test EM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in r["methods"].items():
        a, b = row[f"steps_{short}"], row[f"steps_{long}"]
        lines.append(
            f"| {method} | {row['lr']:g} | {a['best_step']} | {a['best_val_loss']} | "
            f"{a['test_em']:.1f} | {b['best_step']} | {b['best_val_loss']} | {b['test_em']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
