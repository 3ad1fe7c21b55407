"""RANKONE_WEIGHTS=int8 against float32 on the real model: decode speed and what it changes.

On SmolLM2-135M-Instruct with the demo's tasks (``rankone demo --no-serve`` builds them), in
one run:

- **speed**: decode step time by rows (1, 4, 8, 16, 32; every row a different task), the
  float32 fused forward and the int8 one stepping the same rows in alternation, so the ratio
  is measured in one run;
- **accuracy**: every demo task's held-out test inputs (chat format, as
  ``/v1/chat/completions`` renders them), greedy, decoded by the engine's loop (a mixed batch
  of all six tasks) with each forward: exact match per task, the share of requests whose
  whole output is the float32 output (greedy agreement), and the share of generated tokens
  before the first difference.

    python -m bench.int8_quality [--cache .rankone/demo-smollm2] [--limit 48] [--threads 2]

Writes bench/results/int8_quality.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, ROOT, run_lines, write_json
from bench.engine_bench import machine
from bench.real_figures import real_tasks, rows_for
from prompts import load_artifact_dir, load_backbone
from prompts.chat import chat_input_ids
from service.core.tasks import ResolvedTask
from service.engine.base import GenerationRequest, SamplingParams
from service.engine.decode import DecodeLoop
from service.engine.forward import Forward
from service.engine.forwards import choose_forward
from service.engine.prefix_cache import PrefixCache
from service.engine.rows import Row
from trainer.metrics import exact_match

WEIGHTS = ("float32", "int8")


def step_times(backbone: Any, forwards: dict[str, Forward], rows: list[int], steps: int) -> dict:
    """{weights: {rows: median ms per decode step}}, the forwards stepping in alternation."""
    tasks = real_tasks(backbone, 32, 20)
    out: dict[str, dict[str, float]] = {w: {} for w in forwards}
    for n in rows:
        loops = {}
        for w, forward in forwards.items():
            loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 30), forward=forward)
            loop.eos_ids = set()  # fixed token counts
            loop.admit(rows_for(tasks, n, 40, 10_000))  # 20 prompt rows + 40 inputs
            for _ in range(3):
                loop.step()
            loops[w] = loop
        times: dict[str, list[float]] = {w: [] for w in forwards}
        for _ in range(steps):
            for w, loop in loops.items():
                start = time.perf_counter()
                loop.step()
                times[w].append(time.perf_counter() - start)
        for w in forwards:
            out[w][str(n)] = round(statistics.median(times[w]) * 1e3, 2)
        print(f"rows {n}: " + ", ".join(f"{w} {out[w][str(n)]} ms" for w in forwards), flush=True)
    return out


def demo_requests(cache: Path, backbone: Any, limit: int) -> list[tuple[str, list[int], str, Any]]:
    """(task, input ids, target, ResolvedTask) for every demo task's test rows."""
    found = load_artifact_dir(cache / "artifacts", backbone=backbone.fingerprint)
    out = []
    for name, tf in sorted(found.tasks.items()):
        data = cache / "data" / name / "test.jsonl"
        if not data.exists():
            continue
        sp = found.shared[tf.shared]
        task = ResolvedTask(name, 1, sp.id, sp.prompt.float(), tf.u.float(), tf.v.float())
        lines = [json.loads(x) for x in data.read_text().splitlines() if x.strip()][:limit]
        for ex in lines:
            messages = ex["messages"]
            ids = chat_input_ids(backbone.tokenizer, messages[:-1])
            out.append((name, ids, str(messages[-1]["content"]), task))
    return out


def decode_all(backbone: Any, forward: Forward, reqs: list, max_new: int) -> list[list[int]]:
    """Greedy outputs of every request, decoded as one mixed batch of at most 32 rows."""
    results: dict[int, list[int]] = {}
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 30), forward=forward, max_rows=32)
    pending = list(enumerate(reqs))

    def sink(i: int) -> Any:
        def emit(delta: Any) -> None:
            if delta.result is not None:
                results[i] = list(delta.result.token_ids)

        return emit

    while pending or loop.running:
        room = 32 - loop.running
        if room and pending:
            batch, pending = pending[:room], pending[room:]
            loop.admit(
                [
                    Row(
                        request=GenerationRequest(
                            f"r{i}", task, ids, SamplingParams(max_new_tokens=max_new)
                        ),
                        emit=sink(i),
                    )
                    for i, (_, ids, _, task) in batch
                ]
            )
        loop.step()
    return [results[i] for i in range(len(reqs))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / ".rankone" / "demo-smollm2")
    ap.add_argument("--limit", type=int, default=48, help="test rows per task")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per row count (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (args.cache / "artifacts").is_dir():
        raise SystemExit(f"no demo in {args.cache}: build it with `rankone demo --no-serve`")
    backbone = load_backbone(str(args.cache / "backbone"))
    forwards = {w: choose_forward(backbone, weights=w) for w in WEIGHTS}
    started = time.monotonic()
    speed = step_times(backbone, forwards, args.rows, args.steps)
    reqs = demo_requests(args.cache, backbone, args.limit)
    tok = backbone.tokenizer
    outputs = {}
    with torch.inference_mode():
        for w, forward in forwards.items():
            outputs[w] = decode_all(backbone, forward, reqs, args.max_new_tokens)
    per_task: dict[str, dict[str, Any]] = {}
    same = tokens = agreed = 0
    for i, (name, _, target, _) in enumerate(reqs):
        a, b = outputs["float32"][i], outputs["int8"][i]
        row = per_task.setdefault(name, {"n": 0, "float32": 0, "int8": 0, "same_output": 0})
        row["n"] += 1
        for w in WEIGHTS:
            text = tok.decode(outputs[w][i], skip_special_tokens=True)
            row[w] += int(exact_match(text, target))
        row["same_output"] += int(a == b)
        same += int(a == b)
        prefix = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        tokens += len(a)
        agreed += len(a) if prefix is None and len(a) == len(b) else (prefix or min(len(a), len(b)))
    for row in per_task.values():
        for key in ("float32", "int8", "same_output"):
            row[key] = round(100 * row[key] / row["n"], 1)
    n = len(reqs)
    results = {
        "command": " ".join(["python -m bench.int8_quality", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "model": "SmolLM2-135M-Instruct (the demo's GGUF cache)",
        "step_ms_by_rows": speed,
        "int8_speedup_by_rows": {
            r: round(speed["float32"][r] / speed["int8"][r], 2) for r in speed["float32"]
        },
        "requests": n,
        "greedy_same_output_pct": round(100 * same / max(n, 1), 1),
        "tokens_before_first_difference_pct": round(100 * agreed / max(tokens, 1), 1),
        "exact_match_pct": {
            w: round(statistics.mean(r[w] for r in per_task.values()), 1) for w in WEIGHTS
        },
        "per_task": per_task,
        "seconds": round(time.monotonic() - started),
    }
    write_json(RESULTS, "int8_quality", results)
    (RESULTS / "int8_quality.md").write_text(report(results))
    print(report(results))
    return 0


def report(r: dict[str, Any]) -> str:
    speed, up = r["step_ms_by_rows"], r["int8_speedup_by_rows"]
    lines = [
        "# 8-bit weights (RANKONE_WEIGHTS=int8) against float32, SmolLM2-135M-Instruct",
        "",
        *run_lines(r),
        "| rows | float32 ms / step | int8 ms / step | float32 / int8 |",
        "|---|---|---|---|",
        *(f"| {n} | {speed['float32'][n]} | {speed['int8'][n]} | {up[n]} |" for n in up),
        "",
        f"Greedy, the demo's six tasks, {r['requests']} held-out chat requests decoded as one "
        "mixed batch per forward:",
        "",
        "| task | n | exact, float32 | exact, int8 | same output as float32 |",
        "|---|---|---|---|---|",
        *(
            f"| {t} | {v['n']} | {v['float32']}% | {v['int8']}% | {v['same_output']}% |"
            for t, v in r["per_task"].items()
        ),
        f"| **mean** | | **{r['exact_match_pct']['float32']}%** | "
        f"**{r['exact_match_pct']['int8']}%** | **{r['greedy_same_output_pct']}%** |",
        "",
        f"{r['tokens_before_first_difference_pct']}% of the float32 outputs' tokens come before "
        "the first token where int8 differs.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
