"""The fine-tuning worker end to end: real servers (``rankone serve``), real ``rankone worker``
processes, the ``openai`` client and plain HTTP, on the tiny GPT-2.

- embedded mode: the server starts its own worker child at the first job; the openai client
  uploads, creates a job, polls events until it succeeded, and ``completions.create`` with the
  new task's name answers with exactly what the registered factors generate;
- the same through plain HTTP, and a running job cancelled;
- Redis mode: a worker killed with SIGKILL mid-job loses its lease, a second worker gets the
  job and finishes it, and the task has exactly one version.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from prompts import (
    Backbone,
    SharedPrompt,
    TaskFactors,
    decode_task,
    encode_shared,
    encode_task,
    from_base64,
    to_base64,
)
from prompts import load_backbone as _load
from tests.service.conftest import ADMIN, ADMIN_KEY, ROOT, ServerProcess, reference_text, server_env

PROMPT_LENGTH = 4
TRAIN = [{"input": f"word {w}", "target": "yes"} for w in ("a", "b", "c", "d", "e", "f")]


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir: Path) -> Backbone:
    return _load(tiny_gpt2_dir)


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def seed_source(url: str, bb: Backbone) -> None:
    """A shared prompt 'family' and one task over it (the adaptation starts from its factors)."""
    g = torch.Generator().manual_seed(0)
    sp = SharedPrompt("family", torch.randn(PROMPT_LENGTH, bb.dim, generator=g), bb.fingerprint)
    tf = TaskFactors(
        "source-a", "family", torch.ones(PROMPT_LENGTH, 1), torch.ones(1, bb.dim), bb.fingerprint
    )
    with httpx.Client(base_url=url, headers=ADMIN, timeout=30) as c:
        c.post("/v1/shared-prompts", json={"blob": to_base64(encode_shared(sp))}).raise_for_status()
        c.post(
            "/v1/tasks", json={"name": "source-a", "factors": to_base64(encode_task(tf))}
        ).raise_for_status()


def start_worker(url: str, model: Path, log: Path, name: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "rankone_cli", "worker", "--url", url, "--model", str(model)]
    cmd += ["--name", name]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANKONE_WORKER_KEY": ADMIN_KEY}
    out = log.open("ab")
    return subprocess.Popen(
        [*cmd, "--nice", "0", "--threads", "1", "--poll-s", "0.2"],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=out,
    )


@pytest.fixture(scope="module")
def embedded_server(
    tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory, gpt2: Backbone
) -> Iterator[ServerProcess]:
    """One server (and so one embedded worker child) for the module's embedded-mode tests."""
    root = tmp_path_factory.mktemp("embedded")
    env = server_env(tiny_gpt2_dir, data_dir=root / "data", finetune_lease_s=5)
    server = ServerProcess(env, root / "server.log").start()
    seed_source(server.url, gpt2)
    try:
        yield server
    finally:
        server.stop()


def served_equals_factors(server: ServerProcess, bb: Backbone, task: str, text: str) -> str:
    """The completion the openai client gets, checked against the registered factors."""
    import openai

    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY)
    got = (
        oa.completions.create(model=task, prompt=text, max_tokens=4, temperature=0).choices[0].text
    )
    with httpx.Client(base_url=server.url, headers=ADMIN) as c:
        info = c.get(f"/v1/tasks/{task}", params={"include_factors": "true"}).json()
        shared = c.get("/v1/shared-prompts/family", params={"include_blob": "true"}).json()
    tf = decode_task(from_base64(info["factors"]))
    from prompts import decode_shared

    sp = decode_shared(from_base64(shared["blob"]))
    want = reference_text(bb, sp.prompt, tf.u, tf.v, text, 4)
    if want is not None:
        assert got == want
    return got


def test_openai_client_fine_tunes_and_serves_the_new_task(
    embedded_server: ServerProcess, gpt2: Backbone, tmp_path: Path
) -> None:
    import openai

    oa = openai.OpenAI(base_url=f"{embedded_server.url}/v1", api_key=ADMIN_KEY)
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl(TRAIN))
    file = oa.files.create(file=train.open("rb"), purpose="fine-tune")
    valid = oa.files.create(file=("valid.jsonl", jsonl(TRAIN[:2])), purpose="fine-tune")
    job = oa.fine_tuning.jobs.create(
        model="family",
        training_file=file.id,
        validation_file=valid.id,
        suffix="says-yes",
        hyperparameters={"n_epochs": 10, "batch_size": 3},
        seed=1,
        extra_body={"rankone": {"mode": "factors-only"}},
    )
    assert job.status == "queued"
    deadline = time.monotonic() + 120
    while job.status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = oa.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job
    assert job.fine_tuned_model == "says-yes"
    events = list(oa.fine_tuning.jobs.list_events(job.id, limit=100))
    losses = [e.data["train_loss"] for e in reversed(events) if e.data and "train_loss" in e.data]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    served_equals_factors(embedded_server, gpt2, "says-yes", "word a")
    assert "says-yes" in [m.id for m in oa.models.list()]


def test_prompt_tuning_job_chooses_and_registers_its_own_shared_prompt(
    embedded_server: ServerProcess, gpt2: Backbone
) -> None:
    """mode prompt-tuning: the search tries its learning rates from the instruction's text
    init, records every candidate, and registers the winner as shared prompt + U = V = 1."""
    with httpx.Client(base_url=embedded_server.url, headers=ADMIN, timeout=30) as c:
        up = c.post(
            "/v1/files", files={"file": ("t.jsonl", jsonl(TRAIN))}, data={"purpose": "fine-tune"}
        )
        body = {
            "model": "family",
            "training_file": up.json()["id"],
            "suffix": "pt-yes",
            "hyperparameters": {"steps": 8, "batch_size": 2, "instruction": "Say yes"},
            "rankone": {"mode": "prompt-tuning"},
        }
        job = c.post("/v1/fine_tuning/jobs", json=body).json()
        assert job["rankone"]["instruction"] == "Say yes"
        deadline = time.monotonic() + 300  # may include the worker child's cold start
        while (job := c.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in (
            "succeeded",
            "failed",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert job["status"] == "succeeded", job
        metrics = job["rankone"]["metrics"]
        tried = json.loads(metrics["candidates"])
        assert [t["name"] for t in tried] == ["pt-lr0.1", "pt-lr0.03"]
        assert all(t["init"] == "text" and t["best_val_loss"] is not None for t in tried)
        assert metrics["method"] == "pt" and metrics["candidate"] in metrics["choice"]
        events = c.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()["data"]
        assert any(e["message"].startswith("search: pt-lr") for e in events)
        info = c.get("/v1/tasks/pt-yes", params={"include_factors": "true"}).json()
        assert info["shared"] == "pt-yes-prompt"
        shared = c.get("/v1/shared-prompts/pt-yes-prompt", params={"include_blob": "true"})
        assert shared.json()["metadata"]["fine_tuning_job"] == job["id"]
        from prompts import decode_shared

        sp = decode_shared(from_base64(shared.json()["blob"]))
        tf = decode_task(from_base64(info["factors"]))
        assert torch.equal(tf.u, torch.ones_like(tf.u)) and torch.equal(tf.v, torch.ones_like(tf.v))
        got = c.post(
            "/v1/completions",
            json={"model": "pt-yes", "prompt": "word a", "max_tokens": 4, "temperature": 0},
        ).json()
        want = reference_text(gpt2, sp.prompt, tf.u, tf.v, "word a", 4)
        if want is not None:
            assert got["choices"][0]["text"] == want


def test_plain_http_job_and_cancel(embedded_server: ServerProcess) -> None:
    with httpx.Client(base_url=embedded_server.url, headers=ADMIN, timeout=30) as c:
        up = c.post(
            "/v1/files", files={"file": ("t.jsonl", jsonl(TRAIN))}, data={"purpose": "fine-tune"}
        )
        assert up.status_code == 200, up.text
        body = {
            "model": "family",
            "training_file": up.json()["id"],
            "suffix": "long-one",
            "hyperparameters": {"steps": 5000, "batch_size": 1},
        }
        job = c.post("/v1/fine_tuning/jobs", json=body).json()
        deadline = time.monotonic() + 90
        while c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        cancelled = c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        bad = c.post("/v1/fine_tuning/jobs", json={**body, "hyperparameters": {"batch_size": 0}})
        assert bad.status_code == 422 and "batch_size" in bad.json()["error"]["message"]
        time.sleep(2)
        assert c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
        assert c.get("/v1/tasks/long-one").status_code == 404


def test_killed_worker_job_is_reclaimed_with_one_version(
    tiny_gpt2_dir: Path, tmp_path: Path, gpt2: Backbone, redis_server: Any
) -> None:
    url = redis_server.url.rsplit("/", 1)[0] + "/8"
    import redis

    redis.Redis.from_url(url).flushdb()
    env = server_env(tiny_gpt2_dir, redis_url=url, finetune_lease_s=1.5)
    server = ServerProcess(env, tmp_path / "server.log").start()
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        seed_source(server.url, gpt2)
        with httpx.Client(base_url=server.url, headers=ADMIN, timeout=30) as c:
            up = c.post(
                "/v1/files",
                files={"file": ("t.jsonl", jsonl(TRAIN))},
                data={"purpose": "fine-tune"},
            )
            body = {
                "model": "family",
                "training_file": up.json()["id"],
                "suffix": "survivor",
                "hyperparameters": {"steps": 250, "batch_size": 2},
            }
            job = c.post("/v1/fine_tuning/jobs", json=body).json()
            # two workers at once: one claims the job, the other waits warm for the next
            workers = {
                n: start_worker(server.url, tiny_gpt2_dir, tmp_path / f"{n}.log", n)
                for n in ("wa", "wb")
            }
            deadline = time.monotonic() + 90
            while not any(
                e["data"].get("step")
                for e in c.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
            ):
                assert time.monotonic() < deadline, (tmp_path / "wa.log").read_text()[-3000:]
                time.sleep(0.2)
            first = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["rankone"]["worker"]
            workers[first].send_signal(signal.SIGKILL)
            workers[first].wait()
            other = "wb" if first == "wa" else "wa"
            deadline = time.monotonic() + 120
            while (status := c.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in (
                "succeeded",
                "failed",
            ):
                assert time.monotonic() < deadline, (tmp_path / f"{other}.log").read_text()[-3000:]
                time.sleep(0.3)
            assert status["status"] == "succeeded", status
            assert status["rankone"]["attempts"] == 2 and status["rankone"]["worker"] == other
            messages = [
                e["message"]
                for e in c.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=1000").json()["data"]
            ]
            assert any(
                f"worker {first} stopped renewing its lease" in m and "requeued" in m
                for m in messages
            )
            assert any(f"attempt 2 of 3 started by worker {other}" in m for m in messages)
            task = c.get("/v1/tasks/survivor").json()
            assert task["version"] == 1 and task["metadata"]["fine_tuning_job"] == job["id"]
    finally:
        for w in workers.values():
            if w.poll() is None:
                w.kill()
                w.wait()
        server.stop()


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_embedded_worker_killed_mid_job_is_restarted(embedded_server: ServerProcess) -> None:
    """kill -9 of the embedded worker child: the server starts a new one on its own (no other
    job is created), the job is requeued when its lease runs out and ends succeeded, with
    exactly one task version."""
    assert embedded_server.proc is not None
    with httpx.Client(base_url=embedded_server.url, headers=ADMIN, timeout=30) as c:
        up = c.post(
            "/v1/files", files={"file": ("t.jsonl", jsonl(TRAIN))}, data={"purpose": "fine-tune"}
        )
        body = {
            "model": "family",
            "training_file": up.json()["id"],
            "suffix": "phoenix",
            "hyperparameters": {"steps": 300, "batch_size": 2},
        }
        job = c.post("/v1/fine_tuning/jobs", json=body).json()
        deadline = time.monotonic() + 120
        while not any(
            e["data"].get("step")
            for e in c.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
        ):
            assert time.monotonic() < deadline, embedded_server.logs()
            time.sleep(0.2)
        (worker,) = _children(embedded_server.proc.pid)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 180
        while (status := c.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            assert time.monotonic() < deadline, (status, embedded_server.logs())
            time.sleep(0.5)
        assert status["status"] == "succeeded", status
        assert status["rankone"]["attempts"] == 2
        assert _children(embedded_server.proc.pid) not in ([], [worker])  # a new child runs
        task = c.get("/v1/tasks/phoenix").json()
        assert task["version"] == 1 and task["metadata"]["fine_tuning_job"] == job["id"]
