"""What a decode step costs by the number of rows in it (the real backbone, fp32), with the
engine's fused forward and with the HF forward.

Continuous batching wins over ``generate`` by the rows it drops (finished) and the rows it
adds (the next requests). What dropping a row saves depends on how the step's time splits
between a part that grows with the rows (the FLOPs) and a part that does not: this measures the
split, and with the torch profiler the share of each step spent in matrix products (``aten::mm``:
at 1 row they stream every weight from memory, far below the rate of a plain read, which
``weights_read_ms`` gives). Each row count's two forwards (``service/engine/fused_llama.py``
and the HF model's own, as ``generate`` runs it) step in alternation over the same rows, so
``hf_over_fused`` is a ratio measured in one run.

    python -m bench.step_rows [--model PATH] [--threads 2]

Writes bench/results/engine_step_rows.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import RESULTS, run_header, run_lines, write_json
from bench.engine_bench import machine, weights_read
from bench.real_figures import endless_loop, real_tasks, rows_for


def gemm_share(loop: Any, steps: int = 3) -> float:
    """The share of ``steps`` decode steps' CPU time spent in ``aten::mm`` (torch profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            loop.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key == "aten::mm") / max(total, 1)


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
    read = weights_read(backbone)
    read_ms, weights_mb = read["weights_read_ms"], read["weights_mb"]
    by_rows: dict[str, float] = {}
    hf_by_rows: dict[str, float] = {}
    mm_share: dict[str, float] = {}
    for n in args.rows:
        loops = {}
        for fused in (True, False):
            loop = endless_loop(backbone, fused=fused)
            loop.admit(rows_for(tasks, n, 40, 10_000))  # 20 prompt rows + 40 inputs: ~60 positions
            for _ in range(3):
                loop.step()
            loops[fused] = loop
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.steps):
            for fused, loop in loops.items():
                start = time.perf_counter()
                loop.step()
                times[fused].append(time.perf_counter() - start)
        by_rows[str(n)] = statistics.median(times[True]) * 1e3
        hf_by_rows[str(n)] = statistics.median(times[False]) * 1e3
        mm_share[str(n)] = gemm_share(loops[True])
        print(
            f"rows {n}: {by_rows[str(n)]:.0f} ms/step (HF forward {hf_by_rows[str(n)]:.0f}), "
            f"mm {mm_share[str(n)]:.0%}",
            flush=True,
        )
    lo, hi = min(args.rows), max(args.rows)
    per_row = (by_rows[str(hi)] - by_rows[str(lo)]) / (hi - lo)
    # The rate at which the fewest-row step's matrix products get through the weights.
    gemm_gbs = weights_mb * 2**20 / 1e9 / (by_rows[str(lo)] / 1e3 * mm_share[str(lo)])
    read_gbs = weights_mb * 2**20 / 1e9 / (read_ms / 1e3)
    results = {
        **run_header("bench.step_rows", machine()),
        "model": model,
        "step_ms_by_rows": by_rows,
        "hf_step_ms_by_rows": hf_by_rows,
        "hf_over_fused_by_rows": {n: hf_by_rows[n] / by_rows[n] for n in by_rows},
        "gemm_share_by_rows": mm_share,
        "per_added_row_ms": per_row,
        "fixed_share_at_max": by_rows[str(lo)] / by_rows[str(hi)],
        "weights_read_ms": read_ms,
        "gemm_weights_gbs_at_min_rows": gemm_gbs,
        "read_weights_gbs": read_gbs,
    }
    write_json(RESULTS, "engine_step_rows", results)
    table = "\n".join(
        f"| {n} | {ms:.0f} | {mm_share[n]:.0%} | {hf_by_rows[n]:.0f} | {hf_by_rows[n] / ms:.2f} |"
        for n, ms in by_rows.items()
    )
    run = "\n".join(run_lines(results))
    (RESULTS / "engine_step_rows.md").write_text(
        f"""# Decode step time by rows (real backbone, fp32)

{run}
| rows | ms / step | share in `aten::mm` | HF forward: ms / step | HF / fused |
|---|---|---|---|---|
{table}

(ms / step and the `aten::mm` share: the engine's fused forward, `service/engine/fused_llama.py`;
the HF forward is the model's own, as `generate` runs it, stepping the same rows in alternation.)

A step at {lo} row(s) costs {results["fixed_share_at_max"]:.0%} of one at {hi}; each added row
costs {per_row:.1f} ms. At {lo} row(s) the matrix products take
{mm_share[str(lo)]:.0%} of the step: the fixed part is the GEMMs streaming the
{weights_mb:.0f} MB of weights, at {gemm_gbs:.1f} GB/s against {read_gbs:.0f} GB/s for a plain
read of them ({read_ms:.0f} ms), not Python or kernel launches. On this CPU, dropping a finished row saves little, and what continuous batching wins
comes from putting the next request in its place.
"""
    )


if __name__ == "__main__":
    main()
