"""End to end: the HTTP server (continuous engine, 64 concurrent clients) vs bare ``generate``.

Both sides serve the same 64 requests (32 distinct tasks, greedy, fixed token count) on the
same random T5-small-shaped backbone as ``engine_bench.py``: the server through
``POST /v1/tasks/{task}/generate`` with 64 requests in flight, the bare side as
``model.generate`` over the same requests in batches of 32 with the composed prompts
prepended (the backbone's own limit, no HTTP, no scheduling). Runs alternate; the ratio is
the median of the pairs. Writes bench/results/engine_server.{md,json}.

Run: ``python3 bench/server_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine_bench import RESULTS, build_t5_small, machine  # noqa: E402

from prompts import (  # noqa: E402
    Backbone,
    SharedPrompt,
    TaskFactors,
    compose_prompts,
    prepend_prompts,
    save_shared,
    save_task,
)
from tests.redis_server import free_port  # noqa: E402


def seed_dir(
    backbone: Backbone, root: Path, tasks: int, length: int
) -> tuple[torch.Tensor, list[TaskFactors]]:
    """An artifact directory with one shared prompt [L, d] and ``tasks`` rank-1 tasks."""
    g = torch.Generator().manual_seed(1)
    shared = SharedPrompt(
        "family", torch.randn(length, backbone.dim, generator=g) * 0.5, backbone.fingerprint
    )
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
) -> tuple[float, int]:
    """``model.generate`` over the same requests, ``batch`` at a time; (seconds, tokens)."""
    tok = backbone.tokenizer
    start = time.perf_counter()
    generated = 0
    with torch.inference_mode():
        for lo in range(0, len(texts), batch):
            chunk = list(range(lo, min(lo + batch, len(texts))))
            enc = tok([texts[i] for i in chunk], return_tensors="pt", padding=True)
            group = [tasks[i % len(tasks)] for i in chunk]
            prompts = compose_prompts(
                shared[None],
                torch.zeros(len(chunk), dtype=torch.long),
                torch.stack([t.u for t in group]),
                torch.stack([t.v for t in group]),
            )  # [B, L, d]
            prompted = prepend_prompts(
                backbone.embed(enc["input_ids"]), enc["attention_mask"], prompts, causal=False
            )
            out = backbone.model.generate(
                inputs_embeds=prompted.inputs_embeds,
                attention_mask=prompted.attention_mask,
                max_new_tokens=new_tokens,
                do_sample=False,
            )
            generated += (out.shape[1] - 1) * len(chunk)
    return time.perf_counter() - start, generated


async def through_server(
    url: str, texts: list[str], tasks: int, concurrency: int, new_tokens: int
) -> tuple[float, int]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def one(i: int) -> int:
            async with limit:
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
        return time.perf_counter() - start, sum(counts)


def start_server(
    model: Path, seed: Path, data: Path, batch: int, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "rankone_cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"server not ready:\n{log.read_text()[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=20)
    parser.add_argument("--input-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # see engine_bench.py: one thread is far faster on a shared box
    results: dict[str, Any] = {
        "command": "python3 " + " ".join(["bench/server_bench.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        backbone = build_t5_small(tmp / "t5")
        prompt, tasks = seed_dir(backbone, tmp / "seed", args.tasks, args.prompt_len)
        texts = inputs(args.requests, args.input_len)
        proc, url = start_server(
            tmp / "t5", tmp / "seed", tmp / "data", args.batch, tmp / "server.log"
        )
        try:
            asyncio.run(through_server(url, texts[:2], args.tasks, 2, 2))  # warm-up
            bare(backbone, prompt, tasks, texts[:2], args.batch, 2)
            ratios, server_rates, bare_rates = [], [], []
            for _ in range(args.repeats):
                s, n = bare(backbone, prompt, tasks, texts, args.batch, args.new_tokens)
                bare_rates.append(n / s)
                s, n = asyncio.run(
                    through_server(url, texts, args.tasks, args.concurrency, args.new_tokens)
                )
                server_rates.append(n / s)
                ratios.append(server_rates[-1] / bare_rates[-1])
                print(
                    f"bare {bare_rates[-1]:.1f} tok/s, server {server_rates[-1]:.1f} tok/s",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    results.update(
        {
            "server_tokens_per_s": statistics.median(server_rates),
            "bare_tokens_per_s": statistics.median(bare_rates),
            "server_over_bare": statistics.median(ratios),
            "pairs": ratios,
        }
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine_server.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "engine_server.md").write_text(
        "\n".join(
            [
                "# Server end to end vs bare generate",
                "",
                f"Command: `{results['command']}` — {results['date']}",
                "",
                "Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()),
                "",
                f"Random T5-small-shaped backbone, {args.requests} requests over {args.tasks} tasks, "
                f"prompt L = {args.prompt_len}, {args.input_len}-character inputs, {args.new_tokens} new "
                f"tokens, greedy. Server: `rankone serve` with the continuous engine (max wait 50 ms, max batch "
                f"{args.batch}), {args.concurrency} concurrent HTTP clients. Bare: `model.generate` in "
                f"batches of {args.batch}.",
                "",
                "| figure | value | goal |",
                "|---|---|---|",
                f"| server / bare generate throughput | {results['server_over_bare']:.2f} "
                f"({results['server_tokens_per_s']:.0f} vs {results['bare_tokens_per_s']:.0f} tok/s) | ≥ 0.85 |",
                "",
                f"Pairs (bare then server, each a ratio): {', '.join(f'{r:.2f}' for r in ratios)}"
                " — the shared 2-core box swings by ±30 % between runs; the median is the figure.",
                "",
            ]
        )
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
