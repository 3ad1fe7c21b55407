"""Factor store at scale: Redis memory per task and resolve latency, warm and cold.

Starts its own redis-server on a free port, registers one shared prompt and ``--tasks`` tasks
(T5-Base-like: L = 100, d = 768, r = 1) through the real key layout and write script
(pipelined for the bulk load), then measures:

- Redis memory per task: (INFO used_memory after - before) / tasks, next to the raw factor
  bytes (L + d) · r · 4 and the safetensors blob size;
- ``FactorStore.resolve`` latency: cold (device-cache miss: Redis HGETALL + decode + copy to
  the device; the shared prompt stays cached) and warm (device-cache hit), p50 / p99.

    python3 -m bench.store_bench --tasks 100000

writes bench/results/store.md and bench/results/store.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import torch

from bench.common import cpu_name, write_json
from prompts.artifacts import (
    SharedPrompt,
    TaskFactors,
    decode_task,
    encode_shared,
    encode_task,
    utc_now,
)
from service.store.factor_store import FactorStore
from service.store.redis_store import RedisBackend
from tests.redis_server import RedisServer

FINGERPRINT = "bench-t5-base-like"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=100_000, help="tasks to register")
    p.add_argument("--lookups", type=int, default=2_000, help="resolves per measurement")
    p.add_argument("--length", type=int, default=100, help="prompt length L")
    p.add_argument("--dim", type=int, default=768, help="embedding width d")
    p.add_argument("--rank", type=int, default=1, help="factor rank r")
    p.add_argument("--batch", type=int, default=1_000, help="writes per pipeline round trip")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.tasks < 1 or args.lookups < 1:
        p.error("--tasks and --lookups must be >= 1")
    return args


def machine() -> dict[str, Any]:
    cpu = cpu_name("unknown")
    server = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "redis_py": redis.__version__,
        "redis_server": server,
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0],
    }


def used_memory(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("memory")["used_memory"])
    finally:
        client.close()


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in samples_s)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": q[49], "p99_ms": q[98], "mean_ms": statistics.fmean(ms)}


async def bulk_load(backend: RedisBackend, args: argparse.Namespace, names: list[str]) -> int:
    """Register every task with the same write script as the server, pipelined; returns the
    blob size of one task."""
    gen = torch.Generator().manual_seed(args.seed)
    now = utc_now()
    blob_size = 0
    for start in range(0, len(names), args.batch):
        chunk = names[start : start + args.batch]
        u = torch.randn(len(chunk), args.length, args.rank, generator=gen)  # [B, L, r]
        v = torch.randn(len(chunk), args.rank, args.dim, generator=gen)  # [B, r, d]
        async with backend.writer.pipeline(transaction=False) as pipe:
            for i, name in enumerate(chunk):
                blob = encode_task(TaskFactors(name, "p", u[i], v[i], FINGERPRINT, created=now))
                blob_size = len(blob)
                keys, argv = backend.put_args("task", name, blob, "p", {}, "create", now)
                await backend.put_script(keys=keys, args=argv, client=pipe)
            replies = await pipe.execute()
        refused = [r for r in replies if int(r[0]) < 1]
        if refused:
            raise RuntimeError(f"{len(refused)} bulk writes were refused: {refused[:3]}")
    return blob_size


async def timed_resolves(store: FactorStore, names: list[str]) -> list[float]:
    samples = []
    for name in names:
        t0 = time.perf_counter()
        await store.resolve(name)
        samples.append(time.perf_counter() - t0)
    return samples


async def timed_cold(
    store: FactorStore, backend: RedisBackend, names: list[str]
) -> tuple[list[float], list[float], list[float]]:
    """Per task, side by side (the machine's load drifts): the Redis read alone (HGETALL),
    the decode alone, then the cold ``resolve`` that does both through the store."""
    fetch, decode, cold = [], [], []
    for name in names:
        t0 = time.perf_counter()
        record = await backend.get_task(name)
        t1 = time.perf_counter()
        decode_task(record.blob, backbone=FINGERPRINT)
        t2 = time.perf_counter()
        await store.resolve(name)
        t3 = time.perf_counter()
        fetch.append(t1 - t0)
        decode.append(t2 - t1)
        cold.append(t3 - t2)
    return fetch, decode, cold


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    backend = RedisBackend(url)
    store = FactorStore(
        backend,
        backbone_fingerprint=FINGERPRINT,
        dim=args.dim,
        device="cpu",
        dtype=torch.float32,
        cache_bytes=1 << 30,
        max_rank=max(args.rank, 1),
        max_prompt_length=max(args.length, 1),
    )
    gen = torch.Generator().manual_seed(args.seed)
    shared = SharedPrompt("p", torch.randn(args.length, args.dim, generator=gen), FINGERPRINT)
    await backend.put_shared("p", encode_shared(shared), {})
    names = [f"task-{i:06d}" for i in range(args.tasks)]

    before = used_memory(url)
    t0 = time.perf_counter()
    blob_size = await bulk_load(backend, args, names)
    load_s = time.perf_counter() - t0
    after = used_memory(url)

    await store.start()  # subscribe after the bulk load: its events are not part of this bench
    try:
        page = await store.list_tasks(0, 1)
        assert page.total == args.tasks, page.total
        picks = random.Random(args.seed).sample(names, min(args.lookups, len(names)))
        await store.resolve(picks[0])  # caches the shared prompt; cold = task miss only
        fetch, decode, cold = await timed_cold(store, backend, picks[1:])
        warm = await timed_resolves(store, picks[1:])
        assert store.cache_stats().entries == len(picks) + 1
    finally:
        await store.close()

    raw = (args.length + args.dim) * args.rank * 4
    return {
        "tasks": args.tasks,
        "shape": {"L": args.length, "d": args.dim, "r": args.rank},
        "bulk_load_s": load_s,
        "redis_used_memory_delta_bytes": after - before,
        "redis_bytes_per_task": (after - before) / args.tasks,
        "blob_bytes_per_task": blob_size,
        "raw_factor_bytes_per_task": raw,
        "plain_prompt_bytes_per_task": args.length * args.dim * 4,
        "redis_get_task": {"lookups": len(fetch), **percentiles(fetch)},
        "decode_task": {"lookups": len(decode), **percentiles(decode)},
        "resolve_cold": {"lookups": len(cold), **percentiles(cold)},
        "resolve_warm": {"lookups": len(warm), **percentiles(warm)},
        "machine": machine(),
    }


def write_results(result: dict[str, Any], out: Path, command: str) -> None:
    write_json(out, "store", {"command": command, **result})
    s, m = result["shape"], result["machine"]
    cold, warm = result["resolve_cold"], result["resolve_warm"]
    fetch, decode = result["redis_get_task"], result["decode_task"]
    per_task = result["redis_bytes_per_task"]
    lines = [
        "# Factor store: Redis memory and resolve latency",
        "",
        f"`{command}` — {result['tasks']:,} tasks, L = {s['L']}, d = {s['d']}, r = {s['r']}, "
        "float32, one shared prompt.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| Redis memory per task (used_memory delta / tasks) | {per_task:,.0f} B |",
        f"| safetensors blob per task | {result['blob_bytes_per_task']:,} B |",
        f"| raw factor bytes per task, (L + d)·r·4 | {result['raw_factor_bytes_per_task']:,} B |",
        f"| Redis memory / raw factor bytes | {per_task / result['raw_factor_bytes_per_task']:.2f}× |",
        f"| a plain tuned prompt, L·d·4 (for scale) | {result['plain_prompt_bytes_per_task']:,} B |",
        f"| Redis memory for all tasks | {result['redis_used_memory_delta_bytes'] / 2**20:,.1f} MiB |",
        f"| bulk load (pipelined write script, {result['tasks']:,} tasks) | {result['bulk_load_s']:.1f} s |",
        f"| resolve, cold (cache miss → Redis + decode), p50 / p99 | "
        f"{cold['p50_ms']:.3f} / {cold['p99_ms']:.3f} ms ({cold['lookups']:,} lookups) |",
        f"| Redis read alone (backend.get_task: HGETALL), p50 / p99 | "
        f"{fetch['p50_ms']:.3f} / {fetch['p99_ms']:.3f} ms |",
        f"| decode alone (decode_task: parse + validate), p50 / p99 | "
        f"{decode['p50_ms']:.3f} / {decode['p99_ms']:.3f} ms |",
        f"| resolve, warm (device-cache hit), p50 / p99 | "
        f"{warm['p50_ms']:.4f} / {warm['p99_ms']:.4f} ms ({warm['lookups']:,} lookups) |",
        "",
        "Cold means the task's factors are not in the device cache (the shared prompt is);",
        "the device is the CPU here, so no host-to-device copy is included. Redis runs on",
        "the same machine over loopback, single client, sequential lookups; the Redis read,",
        "the decode and the cold resolve are timed side by side for each task. The rest of a",
        "cold resolve is the event loop (the miss runs as one shared task, so concurrent misses",
        "of a task make one read) and the device-cache bookkeeping. The p99 values are",
        "scheduling noise on oversubscribed cores (load average below): across runs the same",
        "~8-10 ms tail lands on the Redis read in one run and on the pure-CPU decode in",
        "another, so read the p50 column.",
        "",
        "Machine: "
        f"{m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, torch {m['torch']}, "
        f"redis-py {m['redis_py']}, {m['redis_server']}; {m['platform']}. "
        f"The machine is shared with other jobs (1-minute load average {m['load_average_1m']:.1f} "
        "at the end of the run), so absolute times, p99 above all, are noisy.",
        "",
    ]
    (out / "store.md").write_text("\n".join(lines))


def main() -> None:
    args = parse_args()
    command = f"python3 -m bench.store_bench --tasks {args.tasks} --lookups {args.lookups}"
    with tempfile.TemporaryDirectory(prefix="rankone-bench-redis-") as workdir:
        server = RedisServer(Path(workdir), appendonly=False).start()
        try:
            result = asyncio.run(run(args, server.url))
        finally:
            server.stop()
    write_results(result, args.out, command)
    print((args.out / "store.md").read_text())


if __name__ == "__main__":
    main()
