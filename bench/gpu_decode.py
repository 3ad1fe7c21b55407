"""Decode steps on a GPU: what the engine's forwards cost by the number of rows, each row a
different task, on SmolLM2-135M's shape.

The real SmolLM2 file (``--model``) is used where it is at hand; otherwise a Llama with
SmolLM2-135M-Instruct's configuration and random weights (hidden 576, 30 layers, 9 heads of
which 3 for keys/values, MLP 1536, vocabulary 49,152, tied head): a step's cost depends on the
shapes, not on the numbers. Each row count's forwards step in alternation over the same rows
(32 tasks over one shared prompt of 20 positions, 40 input tokens), timed with the device
synchronised around each step; the torch profiler gives the share of a step's wall time the GPU
spends in kernels (low: the step is bound by the host launching its ~2,400 operators).

    python -m bench.gpu_decode [--device cuda] [--model PATH] [--rows 1 4 ...]

Writes bench/results/gpu_decode.{md,json}. CUDA only in practice (any torch device runs it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import RESULTS, run_header, run_lines, write_json
from bench.real_figures import endless_loop, real_tasks, rows_for
from prompts import Backbone, load_backbone

# SmolLM2-135M-Instruct's config.json, the fields that set a step's shapes
SMOLLM2_SHAPE: dict[str, Any] = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def build_smollm2_shape(path: Path, seed: int = 0) -> Path:
    """A Llama with SmolLM2-135M's shape and random weights (a small BPE tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_models import bpe_tokenizer

    torch.manual_seed(seed)
    tok = bpe_tokenizer()
    config = LlamaConfig(
        **SMOLLM2_SHAPE,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def variants(path: str, device: str) -> dict[str, tuple[Backbone, bool, str, bool]]:
    """name -> (backbone, fused, weights, graphs): the HF forward and the fused one on the
    float32 model, the fused one with bfloat16, 8-bit and 4-bit copies (``RANKONE_WEIGHTS``),
    both forwards on the model loaded in bfloat16, and the engine's CUDA-graph steps
    (``RANKONE_CUDA_GRAPHS``; eager off a GPU)."""
    f32 = load_backbone(path, device=device)
    bf16 = load_backbone(path, device=device, dtype="bfloat16")
    return {
        "hf f32": (f32, False, "float32", False),
        "fused f32": (f32, True, "float32", False),
        "fused f32 + bf16 weights": (f32, True, "bfloat16", False),
        "fused f32 + int8 weights": (f32, True, "int8", False),
        "fused f32 + int4 weights": (f32, True, "int4", False),
        "hf bf16 model": (bf16, False, "float32", False),
        "fused bf16 model": (bf16, True, "float32", False),
        "fused f32, graphs": (f32, True, "float32", True),
        "fused f32 + bf16 weights, graphs": (f32, True, "bfloat16", True),
        "fused f32 + int4 weights, graphs": (f32, True, "int4", True),
        "fused bf16 model, graphs": (bf16, True, "float32", True),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced_step(loop: Any, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    loop.step()
    sync(device)
    return time.perf_counter() - start


def forward_step_ms(loop: Any, device: torch.device, steps: int) -> dict[str, float | str]:
    """The fused forward's step alone over the loop's rows (no sampling, no bookkeeping),
    eager and replayed from a CUDA graph captured once: what the step costs the device when
    nothing waits for the host. The same open column is rewritten at every call, so ``loop``
    must not step after this."""
    batch = loop.batch
    with torch.inference_mode():  # the loop's caches are inference tensors
        batch.kv.open_column()
        inputs = batch.step_inputs()
    forward = batch.forward

    def timed(fn: Any) -> float:
        times = []
        for _ in range(steps):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    with torch.inference_mode():
        eager = timed(lambda: forward.step(inputs))
        if device.type != "cuda":
            return {"eager": eager}
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    forward.step(inputs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward.step(inputs)
        except Exception as exc:  # the report says why, the other figures stand
            return {"eager": eager, "graph_error": f"{type(exc).__name__}: {exc}"[:300]}
        return {"eager": eager, "graph": timed(graph.replay)}


def kernel_share(loop: Any, device: torch.device, steps: int = 3) -> float | None:
    """The share of ``steps`` steps' wall time the device spends in kernels (profiler)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            loop.step()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    return busy / wall


def graph_cells(f: dict[str, float | str], rows: int) -> str:
    eager = f"{float(f['eager']):.2f}"
    if "graph" not in f:
        return f"{eager} | {f.get('graph_error', 'no graph')}"
    graph = float(f["graph"])
    return f"{eager} | {graph:.2f} ({rows / (graph / 1e3):,.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="", help="backbone (default: SmolLM2's shape, random)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row count (median)")
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_smollm2_shape(Path(tmp) / "smollm2-shape"))
        runs = variants(model, args.device)
    # tasks named per variant: the figures' loops share one prefix cache, keyed by task
    tasks = {
        name: real_tasks(bb, 32, 20, name=f"v{i}")
        for i, (name, (bb, *_)) in enumerate(runs.items())
    }
    step_ms: dict[str, dict[str, float]] = {name: {} for name in runs}
    graphs_off: dict[str, str] = {}  # a graphed loop whose capture failed (then eager)
    busy: dict[str, dict[str, float | None]] = {name: {} for name in runs}
    forward_ms: dict[str, dict[str, dict[str, float | str]]] = {
        name: {} for name, run in runs.items() if run[1] and not run[3]
    }
    for n in args.rows:
        loops = {}
        for name, (bb, fused, weights, graphs) in runs.items():
            loop = endless_loop(bb, max(args.rows), fused=fused, weights=weights, graphs=graphs)
            config: Any = bb.model.config
            vocab = int(config.vocab_size)
            loop.admit(rows_for(tasks[name], n, 40, 10_000, high=min(30000, vocab)))
            for _ in range(3):
                loop.step()
            loops[name] = loop
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.steps):
            for name, loop in loops.items():
                times[name].append(synced_step(loop, device))
        for name, loop in loops.items():
            off = getattr(loop.batch.forward, "off", None)
            if off is not None:
                graphs_off.setdefault(name, f"from {n} rows: {off}")
            step_ms[name][str(n)] = statistics.median(times[name]) * 1e3
            busy[name][str(n)] = kernel_share(loop, device)
            if runs[name][1] and not runs[name][3]:  # fused: the step alone, eager and graphed
                forward_ms[name][str(n)] = forward_step_ms(loop, device, args.steps)
        print(
            f"rows {n}: " + ", ".join(f"{name} {step_ms[name][str(n)]:.1f} ms" for name in runs),
            flush=True,
        )
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    results: dict[str, Any] = {
        **run_header(
            "bench.gpu_decode",
            {
                "device": props.name if props else args.device,
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
            },
        ),
        "model": args.model or "SmolLM2-135M shape, random weights",
        "step_ms_by_rows": step_ms,
        "tok_s_by_rows": {
            name: {n: int(n) / (ms / 1e3) for n, ms in by.items()} for name, by in step_ms.items()
        },
        "kernel_share_by_rows": busy,
        "forward_step_ms_by_rows": forward_ms,  # the forward alone: eager, CUDA graph
        "graphs_off": graphs_off,
    }
    write_json(RESULTS, "gpu_decode", results)
    names = list(runs)
    head = "| rows | " + " | ".join(names) + " |"
    rule = "|---" * (len(names) + 1) + "|"
    lines = [
        f"| {n} | "
        + " | ".join(
            f"{results['tok_s_by_rows'][name][n]:,.0f} ({busy[name][n] or 0:.0%})" for name in names
        )
        + " |"
        for n in step_ms[names[0]]
    ]
    (RESULTS / "gpu_decode.md").write_text(
        "\n".join(
            [
                "# Decode on a GPU: tokens/s by rows, each row a different task",
                "",
                *run_lines(results),
                f"Model: {results['model']}. In brackets: the share of the step's wall time "
                "the GPU spends in kernels (the rest: waiting for the host to launch them).",
                "",
                head,
                rule,
                *lines,
                "",
                *(f"- {name}: graphs off {why}" for name, why in graphs_off.items()),
                "",
                "The fused forward's step alone (no sampling or bookkeeping), ms: eager, and "
                "replayed from a CUDA graph captured once (tok/s of the graph in brackets):",
                "",
                "| rows | " + " | ".join(f"{name}: eager | graph" for name in forward_ms) + " |",
                "|---" * (2 * len(forward_ms) + 1) + "|",
                *(
                    f"| {n} | "
                    + " | ".join(graph_cells(forward_ms[name][n], int(n)) for name in forward_ms)
                    + " |"
                    for n in step_ms[names[0]]
                ),
                "",
            ]
        )
    )


if __name__ == "__main__":
    main()
