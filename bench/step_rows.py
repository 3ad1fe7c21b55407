"""What a decode step costs by the number of rows in it (the real backbone, fp32).

Continuous batching wins over ``generate`` by the rows it drops (finished) and the rows it
adds (the next requests). What dropping a row saves depends on how the step's time splits
between a part that grows with the rows (the FLOPs) and a part that does not (launching ~600
kernels through the HF modules' Python, reading the weights once): this measures the split.

    python3 bench/step_rows.py [--model PATH] [--threads 2]

Writes bench/results/engine_step_rows.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import RESULTS, machine, weights_read
from real_figures import endless_loop, real_tasks, rows_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="backbone (default: the SmolLM2 GGUF file)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per row count (median)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from prompts import load_backbone
    from prompts.gguf import smollm2_gguf_path

    model = args.model or str(smollm2_gguf_path())
    backbone = load_backbone(model)
    tasks = real_tasks(backbone, 32, 20)
    read_ms = weights_read(backbone)["weights_read_ms"]
    by_rows = {}
    for n in args.rows:
        loop = endless_loop(backbone)
        loop.admit(rows_for(tasks, n, 40, 10_000))  # 20 prompt rows + 40 inputs: ~60 positions
        for _ in range(3):
            loop.step()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            loop.step()
            times.append(time.perf_counter() - start)
        by_rows[str(n)] = statistics.median(times) * 1e3
        print(f"rows {n}: {by_rows[str(n)]:.0f} ms/step", flush=True)
    lo, hi = min(args.rows), max(args.rows)
    per_row = (by_rows[str(hi)] - by_rows[str(lo)]) / (hi - lo)
    results = {
        "command": "python3 " + " ".join(["bench/step_rows.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "model": model,
        "step_ms_by_rows": by_rows,
        "per_added_row_ms": per_row,
        "fixed_share_at_max": by_rows[str(lo)] / by_rows[str(hi)],
        "weights_read_ms": read_ms,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine_step_rows.json").write_text(json.dumps(results, indent=2) + "\n")
    table = "\n".join(f"| {n} | {ms:.0f} |" for n, ms in by_rows.items())
    (RESULTS / "engine_step_rows.md").write_text(
        f"""# Decode step time by rows (real backbone, fp32)

Command: `{results["command"]}` — {results["date"]}

Machine: {", ".join(f"{k} {v}" for k, v in results["machine"].items())}

| rows | ms / step |
|---|---|
{table}

A step at {lo} row(s) costs {results["fixed_share_at_max"]:.0%} of one at {hi}; each added row
costs {per_row:.1f} ms. Reading every weight once takes {read_ms:.0f} ms, so the fixed part is
not memory bandwidth but the per-kernel cost of ~30 layers of HF modules (Python and kernel
launches): on this CPU, dropping a finished row saves little, and what continuous batching
wins comes from putting the next request in its place.
"""
    )


if __name__ == "__main__":
    main()
