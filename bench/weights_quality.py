"""Decode weights other than float32 (RANKONE_WEIGHTS=int8, bfloat16, float32-packed) against
float32 on the real model: decode speed and what they change (float32-packed: float32
arithmetic, its agreement measured all the same).

On SmolLM2-135M-Instruct with the demo's tasks (``rankone demo --no-serve`` builds them), in
one run:

- **speed**: decode step time by rows (1, 4, 8, 16, 32; every row a different task), the
  float32 fused forward and each low-precision one stepping the same rows in alternation, so
  the ratios are measured in one run;
- **accuracy**: every demo task's held-out test inputs (chat format, as
  ``/v1/chat/completions`` renders them), greedy, decoded by the engine's loop (a mixed batch
  of all six tasks) with each forward: exact match per task, the share of requests whose
  whole output is the float32 output (greedy agreement), and the share of generated tokens
  before the first difference.

How fast each is depends on the CPU: bfloat16 GEMMs are fast where it has AMX or AVX512-BF16
(oneDNN's kernels) and slow where it has neither; the report names the CPU and its flags.

    python -m bench.weights_quality [--cache .rankone/demo-smollm2] [--limit 48] [--threads 2]

Writes bench/results/weights_quality.{md,json}.
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

from bench.common import RESULTS, ROOT, run_header, run_lines, write_json
from bench.engine_bench import machine
from bench.real_figures import real_tasks, rows_for
from prompts import load_artifact_dir, load_backbone
from prompts.chat import chat_input_ids
from service.core.tasks import ResolvedTask
from service.engine.base import GenerationRequest, SamplingParams
from service.engine.decode import DecodeLoop
from service.engine.forward import Forward
from service.engine.forwards import WEIGHTS, choose_forward
from service.engine.one_row import cpu_flags
from service.engine.prefix_cache import PrefixCache
from service.engine.rows import Row
from trainer.metrics import exact_match

OTHERS = tuple(w for w in WEIGHTS if w != "float32")  # each measured against float32


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
    same = dict.fromkeys(OTHERS, 0)
    agreed = dict.fromkeys(OTHERS, 0)
    tokens = 0
    for i, (name, _, target, _) in enumerate(reqs):
        ref = outputs["float32"][i]
        row = per_task.setdefault(
            name, {"n": 0, **dict.fromkeys(WEIGHTS, 0), **{f"same_{w}": 0 for w in OTHERS}}
        )
        row["n"] += 1
        tokens += len(ref)
        for w in WEIGHTS:
            text = tok.decode(outputs[w][i], skip_special_tokens=True)
            row[w] += int(exact_match(text, target))
        for w in OTHERS:
            got = outputs[w][i]
            row[f"same_{w}"] += int(got == ref)
            same[w] += int(got == ref)
            first = next(
                (k for k, (x, y) in enumerate(zip(ref, got, strict=False)) if x != y), None
            )
            agreed[w] += (
                len(ref)
                if first is None and len(ref) == len(got)
                else (first or min(len(ref), len(got)))
            )
    for row in per_task.values():
        for key in (*WEIGHTS, *(f"same_{w}" for w in OTHERS)):
            row[key] = round(100 * row[key] / row["n"], 1)
    n = len(reqs)
    results = {
        **run_header("bench.weights_quality", machine()),
        "cpu_matrix_flags": cpu_matrix_flags(),
        "model": "SmolLM2-135M-Instruct (the demo's GGUF cache)",
        "step_ms_by_rows": speed,
        "speedup_by_rows": {
            w: {r: round(speed["float32"][r] / speed[w][r], 2) for r in speed["float32"]}
            for w in OTHERS
        },
        "requests": n,
        "greedy_same_output_pct": {w: round(100 * same[w] / max(n, 1), 1) for w in OTHERS},
        "tokens_before_first_difference_pct": {
            w: round(100 * agreed[w] / max(tokens, 1), 1) for w in OTHERS
        },
        "exact_match_pct": {
            w: round(statistics.mean(r[w] for r in per_task.values()), 1) for w in WEIGHTS
        },
        "per_task": per_task,
        "seconds": round(time.monotonic() - started),
    }
    write_json(RESULTS, "weights_quality", results)
    (RESULTS / "weights_quality.md").write_text(report(results))
    print(report(results))
    return 0


def cpu_matrix_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's matrix-math flags that decide the low-precision kernels (Linux; else [])."""
    flags = cpu_flags(cpuinfo)
    wanted = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
    return [f for f in wanted if f in flags]


def report(r: dict[str, Any]) -> str:
    speed, up = r["step_ms_by_rows"], r["speedup_by_rows"]
    low = list(up)
    lines = [
        "# Decode weights (RANKONE_WEIGHTS) against float32, SmolLM2-135M-Instruct",
        "",
        *run_lines(r),
        f"CPU matrix flags: {', '.join(r['cpu_matrix_flags']) or 'none read'}.",
        "",
        "| rows | float32 ms / step | "
        + " | ".join(f"{w} ms / step | float32 / {w}" for w in low)
        + " |",
        "|---|---|" + "---|---|" * len(low),
        *(
            f"| {n} | {speed['float32'][n]} | "
            + " | ".join(f"{speed[w][n]} | {up[w][n]}" for w in low)
            + " |"
            for n in speed["float32"]
        ),
        "",
        f"Greedy, the demo's six tasks, {r['requests']} held-out chat requests decoded as one "
        "mixed batch per forward:",
        "",
        "| task | n | exact, float32 | "
        + " | ".join(f"exact, {w} | same output as float32, {w}" for w in low)
        + " |",
        "|---|---|---|" + "---|---|" * len(low),
        *(
            f"| {t} | {v['n']} | {v['float32']}% | "
            + " | ".join(f"{v[w]}% | {v[f'same_{w}']}%" for w in low)
            + " |"
            for t, v in r["per_task"].items()
        ),
        f"| **mean** | | **{r['exact_match_pct']['float32']}%** | "
        + " | ".join(
            f"**{r['exact_match_pct'][w]}%** | **{r['greedy_same_output_pct'][w]}%**" for w in low
        )
        + " |",
        "",
        "Share of the float32 outputs' tokens before the first token where each differs: "
        + ", ".join(f"{w} {r['tokens_before_first_difference_pct'][w]}%" for w in low)
        + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
