"""Drive the docker-compose stack end to end, as a user would (``make compose-test``).

    python3 docker/compose_test.py --tag compose-test --workdir /tmp/x

Run by ``docker/compose-test.sh`` once the images ``rankone-{service,trainer}:<tag>-cpu`` and
``rankone-{redis,proxy}:<tag>-local`` exist. It writes a throwaway compose project (the repo's
compose files, the CPU and offline overrides, a fresh ``.env`` with an admin key and a small
demo budget), starts it, and checks, through the proxy's port on 127.0.0.1:

  the images read GGUF files; the service image ships rankone's CPU kernels ·
  up (init builds the demo, /readyz 200, every container healthy) · the demo seeded Redis ·
  register a task · generate (native, OpenAI) · --scale service=2 and a PUT reaches both
  replicas · the task-affinity proxy sends each task to one replica · `restart redis` ·
  SIGKILL of a replica · down + up keeps the task (AOF) ·
  down -v leaves nothing behind.

Stdlib only (plus PyYAML, which Debian's docker-compose brings, for the ``!reset`` bridge).
Each check prints one line; a failure prints the containers' logs. The last line is
``compose-test: N passed, M failed``. The stack is always taken down with its volumes.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "rankonecomposetest"
DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
# The real demo code path on a small budget: a backbone pretrained for seconds, few steps.
DEMO_ARGS = "--pretrain-minutes 1 --teach-steps 4 --distill-steps 4"
PROBES = ["dcba", "hello", "qwerty"]
# The test's own settings on top of the repo's files. One torch thread per container: on a
# small shared CI machine, torch's default (one per core, in each of 3 containers) spins its
# threads against each other and runs several times slower. The demo's small T5 backbone
# (`rankone demo --backbone t5-demo`, chosen by RANKONE_DEMO_BACKBONE) builds in a couple of
# minutes; the default SmolLM2 demo would take far longer on this budget.
TEST_OVERRIDE = """\
services:
  init:
    environment:
      OMP_NUM_THREADS: "1"
      RANKONE_DEMO_BACKBONE: t5-demo
  service:
    environment:
      OMP_NUM_THREADS: "1"
"""
TASK = "compose-test-task"


class CheckFailed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def wait_for(what: str, probe: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
    """Call ``probe`` until it returns a truthy value (returned) or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (OSError, CheckFailed, urllib.error.URLError) as e:
            last = e
        time.sleep(interval)
    raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what} (last: {last})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- HTTP -----------------------------------------------------------------------------------


def http(
    method: str, url: str, body: Any = None, key: str | None = None, timeout: float = 60
) -> tuple[int, Any]:
    """One JSON request: (status, decoded body or raw text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("content-type", "application/json")
    if key:
        req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


# ---- the compose project ------------------------------------------------------------------


class Stack:
    """A throwaway compose project in ``workdir`` and the docker commands that inspect it."""

    def __init__(
        self,
        workdir: Path,
        tag: str,
        *,
        overrides: dict[str, str] | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        """``overrides``: more compose files ({file name: YAML}) after the test's own;
        ``settings``: more .env lines ({variable: value})."""
        self.workdir = workdir
        self.tag = tag
        self.overrides = {"docker-compose.test.yml": TEST_OVERRIDE, **(overrides or {})}
        self.files = [
            "docker-compose.yml",
            "docker-compose.cpu.yml",
            "docker-compose.local.yml",
            *self.overrides,
        ]
        self.settings = settings or {}
        self.port = free_port()
        self.admin_key = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"

    def write(self) -> None:
        """The repo's compose files (``!reset`` applied for Compose v1) + overrides + .env."""
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        shutil.copytree(
            ROOT / "docker", self.workdir / "docker", ignore=shutil.ignore_patterns("wheels")
        )
        subprocess.run(
            [sys.executable, str(ROOT / "docker/compose_v1_reset.py"),
             str(ROOT / "docker-compose.yml"), str(ROOT / "docker-compose.cpu.yml"),
             str(self.workdir / "reset")],
            check=True,
        )  # fmt: skip
        shutil.copy(self.workdir / "reset/base.yml", self.workdir / "docker-compose.yml")
        shutil.copy(self.workdir / "reset/override.yml", self.workdir / "docker-compose.cpu.yml")
        shutil.copy(ROOT / "docker-compose.local.yml", self.workdir / "docker-compose.local.yml")
        for name, text in self.overrides.items():
            (self.workdir / name).write_text(text)
        settings = {
            "RANKONE_ADMIN_KEYS": self.admin_key,
            "RANKONE_HOST_PORT": str(self.port),
            "RANKONE_BIND_ADDRESS": "127.0.0.1",
            "RANKONE_IMAGE_TAG": self.tag,
            "RANKONE_DEMO_ARGS": DEMO_ARGS,
            "RANKONE_LOG_LEVEL": "WARNING",
            **self.settings,
        }
        lines = []
        for line in (ROOT / ".env.example").read_text().splitlines():
            name = line.split("=", 1)[0]
            lines.append(f"{name}={settings.pop(name)}" if name in settings else line)
        lines += [f"{name}={value}" for name, value in settings.items()]
        (self.workdir / ".env").write_text("\n".join(lines) + "\n")

    def compose(self, *args: str, timeout: float = 900) -> str:
        files = self.files
        cmd = ["docker-compose", "-p", PROJECT, *(a for f in files for a in ("-f", f)), *args]
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
        if "DOCKER_HOST" in os.environ:
            env["DOCKER_HOST"] = os.environ["DOCKER_HOST"]
        res = subprocess.run(
            cmd, cwd=self.workdir, env=env, capture_output=True, text=True, timeout=timeout
        )
        if res.returncode != 0:
            raise CheckFailed(f"{' '.join(cmd[3 + 2 * len(files) :])} failed:\n{res.stderr}")
        return res.stdout

    def docker(self, *args: str) -> str:
        res = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise CheckFailed(f"docker {' '.join(args)} failed: {res.stderr.strip()}")
        return res.stdout

    def containers(self, service: str) -> list[str]:
        out = self.docker(
            "ps", "-aq", "--no-trunc",
            "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--filter", f"label=com.docker.compose.service={service}",
        )  # fmt: skip
        return sorted(out.split())

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(self.docker("inspect", container))[0]

    def health(self, container: str) -> str:
        state = self.inspect(container)["State"]
        return state.get("Health", {}).get("Status", state["Status"])

    def replica_url(self, container: str) -> str:
        """The replica's own address on the project's bridge network (not through the proxy)."""
        networks = self.inspect(container)["NetworkSettings"]["Networks"]
        ip = next(iter(networks.values()))["IPAddress"]
        return f"http://{ip}:8000"

    def show_logs(self) -> None:
        print("---- docker-compose ps / logs (last 60 lines per container) ----", flush=True)
        for args in (["ps"], ["logs", "--no-color", "--tail=60"]):
            try:
                print(self.compose(*args, timeout=120), flush=True)
            except (CheckFailed, subprocess.TimeoutExpired) as e:
                print(f"({e})")


# ---- the checks ---------------------------------------------------------------------------


class Driver:
    def __init__(self, stack: Stack) -> None:
        self.s = stack
        self.passed = 0
        self.demo_tasks: list[str] = []

    def ok(self, message: str) -> None:
        self.passed += 1
        print(f"ok {self.passed:2d}: {message}", flush=True)

    # -- helpers --

    def admin(self, method: str, path: str, body: Any = None, base: str | None = None):
        return http(method, (base or self.s.url) + path, body, key=self.s.admin_key)

    def generate(self, task: str, base: str | None = None) -> dict[str, Any]:
        body = {"inputs": PROBES, "parameters": {"max_new_tokens": 8, "temperature": 0}}
        status, out = http("POST", f"{base or self.s.url}/v1/tasks/{task}/generate", body)
        expect(status == 200, f"generate {task} on {base or 'the proxy'}: {status} {out}")
        expect(len(out["texts"]) == len(PROBES), f"generate {task}: {out}")
        return out

    def put(self, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """PUT the task as a client would, retrying a 503 a few times: the server refuses (and
        does not retry) a write it cannot be sure of, e.g. on a pooled Redis connection that
        died with a Redis restart. Returns (the new record, how many 503s came first)."""
        for refused in range(6):
            status, out = self.admin("PUT", f"/v1/tasks/{TASK}", body)
            if status != 503:
                expect(status == 200, f"PUT {TASK}: {status} {out}")
                return out, refused
            time.sleep(0.5)
        raise CheckFailed(f"PUT {TASK}: still 503 after 6 tries: {out}")

    def factors(self, task: str) -> dict[str, Any]:
        status, info = self.admin("GET", f"/v1/tasks/{task}?include_factors=true")
        expect(status == 200 and info.get("u") and info.get("v"), f"GET {task}: {status}")
        return {"shared": info["shared"], "u": info["u"], "v": info["v"]}

    def wait_healthy(self, service: str, count: int, timeout: float) -> list[str]:
        def probe() -> list[str] | None:
            ids = [c for c in self.s.containers(service) if self.s.health(c) == "healthy"]
            return ids if len(ids) == count else None

        return wait_for(f"{count} healthy {service} container(s)", probe, timeout)

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        wait_for("/readyz 200 through the proxy", lambda: http("GET", self.s.url + "/readyz", timeout=5)[0] == 200, timeout)  # fmt: skip
        return time.monotonic() - t0

    def wait_version(self, base: str, version: int) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            out = self.generate(TASK, base)
            return out if out["version"] == version else None

        return wait_for(f"{TASK} v{version} served by {base}", probe, 15, interval=0.5)

    # -- steps --

    def images_read_gguf(self) -> None:
        """Both images can load a .gguf backbone (RANKONE_MODEL=model.gguf, the trainer's
        SmolLM2 demo): transformers needs gguf-py and accelerate for it. Checked in the image,
        without a model: the stack below serves the small T5 demo."""
        check = (
            "from transformers.utils import is_accelerate_available, is_gguf_available; "
            "assert is_gguf_available() and is_accelerate_available(), 'gguf or accelerate missing'"
        )
        for image in (f"rankone-service:{self.s.tag}-cpu", f"rankone-trainer:{self.s.tag}-cpu"):
            self.s.docker("run", "--rm", "--entrypoint", "python3", image, "-c", check)
        self.ok("the service and trainer images have what loading a GGUF file needs")

    def image_ships_kernels(self) -> None:
        """The service image (no compiler) ships rankone's CPU kernels built for both kinds of
        AVX-512 CPU (``one_row.prebuild``), and loads them where this CPU has AVX-512 (the
        stack's T5 demo runs the HF forward: checked in the image)."""
        check = (
            "from service.engine import one_row; "
            "print(len(list(one_row.PREBUILT.glob('one_row_*.so'))), one_row._isa() is not None); "
            "print(one_row.load() or 'loaded')"
        )
        image = f"rankone-service:{self.s.tag}-cpu"
        shipped, _, loaded = (
            self.s.docker("run", "--rm", "--entrypoint", "python3", image, "-c", check)
            .strip()
            .partition("\n")
        )
        count, avx512 = shipped.split()
        expect(count == "2", f"the service image should ship 2 kernel libraries: {shipped}")
        if avx512 == "True":
            expect(loaded == "loaded", f"the image's kernels should load on this CPU: {loaded}")
        self.ok(f"the service image ships rankone's CPU kernels (here: {loaded[:120]})")

    def up(self) -> None:
        # A clean slate: a run killed half way (CI timeout) may have left the project behind.
        self.s.compose("down", "-v", "--remove-orphans", timeout=300)
        t0 = time.monotonic()
        self.s.compose("up", "-d", "--no-build", timeout=1800)
        init = self.s.containers("init")
        expect(len(init) == 1, f"one init container, found {init}")
        state = wait_for("init to finish", lambda: (st := self.s.inspect(init[0])["State"])["Status"] == "exited" and st, 1200, 3)  # fmt: skip
        expect(state["ExitCode"] == 0, f"init exited with {state['ExitCode']}")
        self.ok(f"init built the demo into its volume and exited 0 ({time.monotonic() - t0:.0f} s)")
        waited = self.wait_ready(600)
        for service in ("redis", "service", "proxy"):
            self.wait_healthy(service, 1, 120)
        self.ok(
            f"/readyz 200 through 127.0.0.1:{self.s.port} {waited:.0f} s later; redis, service, proxy healthy"
        )

    def demo_seeded(self) -> None:
        status, page = self.admin("GET", "/v1/tasks?limit=100")
        expect(status == 200, f"GET /v1/tasks: {status} {page}")
        self.demo_tasks = [t["name"] for t in page["tasks"]]
        expect(len(self.demo_tasks) >= 2, f"the demo should seed several tasks: {self.demo_tasks}")
        status, info = http("GET", self.s.url + "/v1/info")
        expect(status == 200, f"GET /v1/info: {status}")
        self.generate(self.demo_tasks[0])
        b = info.get("backbone") or {}
        self.ok(
            f"the server seeded Redis from the demo: {len(self.demo_tasks)} tasks "
            f"({', '.join(self.demo_tasks)}); backbone {b.get('kind')} d={b.get('d')} on {b.get('device')}"
        )

    def register(self) -> None:
        body = {"name": TASK, **self.factors(self.demo_tasks[0]), "description": "compose-test"}
        status, out = http("POST", self.s.url + "/v1/tasks", body)
        expect(status == 401, f"register without the admin key must be 401, got {status}")
        status, out = self.admin("POST", "/v1/tasks", body)
        expect(status == 201 and out["version"] == 1, f"register: {status} {out}")
        self.ok(
            f"registered {TASK} (copy of {self.demo_tasks[0]}'s factors): 201, v1; 401 without the key"
        )

    def generate_native(self) -> None:
        out = self.generate(TASK)
        ref = self.generate(self.demo_tasks[0])
        expect(out["version"] == 1, f"served version {out['version']}")
        expect(out["texts"] == ref["texts"], f"{out['texts']} != {ref['texts']} (same factors)")
        expect(all(o["finish_reason"] in ("stop", "length") for o in out["outputs"]), str(out))
        self.ok(f"native generate: {out['texts']} (v1, same as {self.demo_tasks[0]})")

    def generate_openai(self) -> None:
        native = self.generate(TASK)["texts"][0]
        body = {"model": TASK, "prompt": PROBES[0], "max_tokens": 8, "temperature": 0}
        status, out = http("POST", self.s.url + "/v1/completions", body)
        expect(status == 200, f"/v1/completions: {status} {out}")
        expect(out["choices"][0]["text"] == native, f"{out['choices'][0]['text']!r} != {native!r}")
        status, models = http("GET", self.s.url + "/v1/models")
        expect(status == 200 and TASK in [m["id"] for m in models["data"]], f"/v1/models: {models}")
        self.ok(f"OpenAI /v1/completions gives the native text {native!r}; /v1/models lists {TASK}")

    def scale_and_put(self) -> None:
        self.s.compose("up", "-d", "--no-build", "--scale", "service=2", timeout=600)
        replicas = self.wait_healthy("service", 2, 600)
        bases = [self.s.replica_url(c) for c in replicas]
        for base in bases:  # warm each replica's device cache with v1
            expect(self.generate(TASK, base)["version"] == 1, f"{base} does not serve v1")
        # v2 takes the factors of a demo task whose output differs from v1's when there is one
        # (a demo built on a tiny budget may answer every task alike; the version still counts).
        v1 = self.generate(TASK)["texts"]
        outputs = {t: self.generate(t)["texts"] for t in self.demo_tasks[1:]}
        other = next((t for t, texts in outputs.items() if texts != v1), self.demo_tasks[1])
        out, refused = self.put(self.factors(other))
        expect(out["version"] == 2 and not refused, f"PUT: {refused} refusals, {out}")
        for base in bases:
            got = self.wait_version(base, 2)
            ref = self.generate(other, base)
            expect(
                got["texts"] == ref["texts"], f"{base}: {got['texts']} != {other}'s {ref['texts']}"
            )
        same = " (the same as v1's)" if outputs[other] == v1 else ""
        self.ok(
            f"2 replicas ({', '.join(bases)}) both serve {TASK} v2 after one PUT through the "
            f"proxy: {other}'s output {outputs[other]}{same}"
        )

    def task_requests(self, base: str) -> dict[str, float]:
        """The replica's generate requests per task so far (its per-task /metrics series)."""
        with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("rankone_task_requests_total{") and 'outcome="ok"' in line:
                task = line.split('task="', 1)[1].split('"', 1)[0]
                found[task] = found.get(task, 0.0) + float(line.rsplit(" ", 1)[1])
        return found

    def use_proxy(self, affinity: bool) -> None:
        """Recreate the proxy with docker/nginx.conf or, with the affinity override, with
        docker/nginx.affinity.conf (which reads the replicas' addresses when it starts)."""
        name = "docker-compose.affinity.yml"
        if affinity and name not in self.s.files:
            shutil.copy(ROOT / name, self.s.workdir / name)
            self.s.files.append(name)
        elif not affinity and name in self.s.files:
            self.s.files.remove(name)
        self.s.compose("up", "-d", "--no-build", "--no-deps", "--force-recreate", "proxy", timeout=300)  # fmt: skip
        self.wait_ready(120)

    def affinity_routing(self) -> None:
        """docker-compose.affinity.yml in front of the 2 replicas: each task's generate
        requests all reach one replica (its prompt prefix stays cached there)."""
        self.use_proxy(affinity=True)
        try:
            bases = [self.s.replica_url(c) for c in self.wait_healthy("service", 2, 120)]
            tasks = [TASK, *self.demo_tasks]
            before = [self.task_requests(b) for b in bases]
            for task in tasks:
                for _ in range(4):
                    self.generate(task)
            after = [self.task_requests(b) for b in bases]
            served = {
                task: [
                    i
                    for i, (b, a) in enumerate(zip(before, after, strict=True))
                    if a.get(task, 0) > b.get(task, 0)
                ]
                for task in tasks
            }
            spread = {task: on for task, on in served.items() if len(on) != 1}
            expect(not spread, f"tasks not on exactly one replica: {spread}")
            split = [sum(on == [i] for on in served.values()) for i in range(len(bases))]
        finally:
            self.use_proxy(affinity=False)
        self.ok(
            f"task affinity: each of {len(tasks)} tasks' 4 requests reached one replica "
            f"(tasks per replica {split})"
        )

    def restart_redis(self) -> None:
        self.s.compose("restart", "redis", timeout=300)
        self.wait_healthy("redis", 1, 120)
        waited = self.wait_ready(120)
        status, info = self.admin("GET", f"/v1/tasks/{TASK}")
        expect(status == 200 and info["version"] == 2, f"after restart: {status} {info}")
        # The replicas resubscribed: a write after the restart still reaches both.
        out, refused = self.put(self.factors(self.demo_tasks[0]))
        expect(out["version"] == 3, f"PUT after restart: {out}")
        for c in self.s.containers("service"):
            self.wait_version(self.s.replica_url(c), 3)
        self.ok(
            f"`restart redis`: ready again in {waited:.0f} s, {TASK} kept v2; a new PUT (v3, after "
            f"{refused} retryable 503) reached both replicas"
        )

    def kill_replica(self) -> None:
        victim = self.s.containers("service")[0]
        before = self.s.inspect(victim)
        os.kill(before["State"]["Pid"], signal.SIGKILL)  # a crash, not a `docker stop`
        t0 = time.monotonic()
        wait_for("the killed replica to restart", lambda: self.s.inspect(victim)["RestartCount"] > before["RestartCount"], 120)  # fmt: skip
        self.wait_healthy("service", 2, 600)
        self.wait_version(self.s.replica_url(victim), 3)
        # nginx re-resolves `service` every 10 s: wait until the proxy answers 5 in a row.
        streak = [0]

        def proxy_ok() -> bool:
            streak[0] = streak[0] + 1 if self.generate(TASK)["version"] == 3 else 0
            return streak[0] >= 5

        wait_for("5 proxied generates in a row", proxy_ok, 60, interval=0.2)
        self.ok(
            f"SIGKILL of replica {victim[:12]}: restarted by its policy, healthy and serving v3 in {time.monotonic() - t0:.0f} s"
        )

    def down_up(self) -> None:
        self.s.compose("down", timeout=300)
        expect(
            not self.s.containers("service") and not self.s.containers("redis"),
            "containers left after down",
        )
        self.s.compose("up", "-d", "--no-build", timeout=900)
        waited = self.wait_ready(600)
        status, info = self.admin("GET", f"/v1/tasks/{TASK}")
        expect(status == 200 and info["version"] == 3, f"after down/up: {status} {info}")
        expect(self.generate(TASK)["version"] == 3, "not served at v3 after down/up")
        init_log = self.s.compose("logs", "--no-color", "init", timeout=60)
        expect("already built" in init_log, f"init rebuilt the demo:\n{init_log[-2000:]}")
        self.ok(
            f"`down` + `up`: ready in {waited:.0f} s, {TASK} still v3 (AOF volume), init reused the demo volume"
        )

    def down_volumes(self) -> None:
        self.s.compose("down", "-v", "--remove-orphans", timeout=300)
        label = f"label=com.docker.compose.project={PROJECT}"
        left = {
            "containers": self.s.docker("ps", "-aq", "--filter", label).split(),
            "volumes": self.s.docker("volume", "ls", "-q", "--filter", label).split(),
            "networks": self.s.docker("network", "ls", "-q", "--filter", label).split(),
        }
        expect(not any(left.values()), f"left behind by down -v: {left}")
        with socket.socket() as s:
            expect(s.connect_ex(("127.0.0.1", self.s.port)) != 0, "the proxy port still answers")
        self.ok(
            "`down -v`: no container, volume or network of the project left; the port is closed"
        )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tag", default="compose-test", help="image tag built by compose-test.sh")
    p.add_argument(
        "--workdir", type=Path, required=True, help="where the compose project is written"
    )
    args = p.parse_args()
    stack = Stack(args.workdir, args.tag)
    stack.write()
    driver = Driver(stack)
    steps = [
        driver.images_read_gguf, driver.image_ships_kernels, driver.up, driver.demo_seeded, driver.register, driver.generate_native,
        driver.generate_openai, driver.scale_and_put, driver.affinity_routing,
        driver.restart_redis,
        driver.kill_replica, driver.down_up, driver.down_volumes,
    ]  # fmt: skip
    failed = 0
    t0 = time.monotonic()
    try:
        for step in steps:
            step()
    except (CheckFailed, subprocess.TimeoutExpired, OSError, KeyError, TypeError) as e:
        failed = 1
        print(f"FAIL: {step.__name__}: {e}", flush=True)
        stack.show_logs()
    finally:
        if failed or step is not driver.down_volumes:
            try:
                stack.compose("down", "-v", "--remove-orphans", timeout=300)
            except (CheckFailed, subprocess.TimeoutExpired) as e:
                print(f"cleanup: {e}")
    print(f"compose-test: {driver.passed} passed, {failed} failed ({time.monotonic() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
