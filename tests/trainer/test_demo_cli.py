"""``rankone demo``'s process handling: the port check (TIME_WAIT is free, a listener is not,
the suggested port is free) and SIGINT stopping the server and its fine-tuning worker. The demo
runs on an already-built cache over a tiny chat model: no training here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from prompts import SharedPrompt, TaskFactors, load_backbone
from prompts.artifacts import save_shared, save_task
from tests.gguf_files import build_tiny_tied_llama
from tests.redis_server import free_port
from trainer.demo import cli as demo_cli
from trainer.demo.smollm_build import RECIPE_VERSION

ROOT = Path(__file__).resolve().parents[2]


def test_a_port_in_time_wait_is_free_and_a_listening_one_is_not() -> None:
    host = "127.0.0.1"
    listener = socket.create_server((host, 0))
    port = listener.getsockname()[1]
    client = socket.create_connection((host, port))
    conn, _ = listener.accept()
    conn.close()  # the server side closes first: its end waits in TIME_WAIT on `port`
    client.close()
    listener.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind((host, port))  # the TIME_WAIT is there: a bind without SO_REUSEADDR fails
    assert demo_cli.port_is_free(host, port)

    with socket.create_server((host, 0)) as busy:
        taken = busy.getsockname()[1]
        assert not demo_cli.port_is_free(host, taken)
        suggested = demo_cli.free_port_near(host, taken)
        assert suggested is not None and suggested != taken
        assert demo_cli.port_is_free(host, suggested)
        with pytest.raises(SystemExit, match=f"port {suggested} is free"):
            demo_cli.main(["--port", str(taken), "--cache-dir", "/nonexistent"])


def built_demo_cache(root: Path) -> Path:
    """A demo cache as a finished SmolLM2-recipe build leaves it, over a tiny chat Llama."""
    model = build_tiny_tied_llama(root / "model", seed=3)
    bb = load_backbone(model)
    cache = root / "cache"
    (cache / "data" / "alpha").mkdir(parents=True)
    (cache / "data" / "sizes.json").write_text("{}\n")
    turn = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    (cache / "data" / "alpha" / "test.jsonl").write_text(json.dumps({"messages": turn}) + "\n")
    save_shared(cache / "artifacts", SharedPrompt("mpt", torch.randn(4, bb.dim), bb.fingerprint))
    u, v = torch.ones(4, 1), torch.ones(1, bb.dim)
    save_task(cache / "artifacts", TaskFactors("alpha", "mpt", u, v, bb.fingerprint))
    recipe = {"backbone": "smollm2", "version": RECIPE_VERSION, "tasks": ["alpha"]}
    manifest = {"recipe": recipe, "model": str(model), "accepts": {"alpha": "anything"}}
    (cache / "demo.json").write_text(json.dumps(manifest) + "\n")
    return cache


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (of any of its threads)."""
    found = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(p) for p in path.read_text().split()]
        except OSError:
            continue
    return [p for p in found if alive(p)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_sigint_stops_the_server_and_its_fine_tuning_worker(tmp_path: Path) -> None:
    cache = built_demo_cache(tmp_path)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANKONE_LOG_LEVEL": "WARNING"}
    log = (tmp_path / "demo.log").open("wb")
    cmd = [sys.executable, "-m", "rankone_cli", "demo", "--cache-dir", str(cache)]
    demo = subprocess.Popen(
        [*cmd, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
        # as a shell starts a background job: SIGINT ignored (the demo must handle it anyway)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, "the demo's server")
        (server,) = children(demo.pid)
        # a fine-tuning job starts the server's worker child
        lines = b'{"input": "a", "target": "b"}\n' * 4
        files = {"file": ("train.jsonl", lines)}
        f = httpx.post(f"{url}/v1/files", files=files, data={"purpose": "fine-tune"}).json()
        job = {"model": "mpt", "training_file": f["id"], "hyperparameters": {"n_epochs": 100}}
        assert httpx.post(f"{url}/v1/fine_tuning/jobs", json=job).status_code == 200
        wait_for(lambda: bool(children(server)), 60, "the fine-tuning worker")
        (worker,) = children(server)

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0
        assert not alive(server) and not alive(worker)
    finally:
        left = children(demo.pid)
        for pid in [*left, *(c for p in left for c in children(p))]:
            os.kill(pid, signal.SIGKILL)
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        log.close()
