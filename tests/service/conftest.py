"""Service fixtures: the tiny backbones loaded once, artifact builders, and real servers.

``ServerProcess`` runs ``rankone serve`` in a subprocess on a free loopback port — the way a
user runs it — and waits for ``/readyz``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import torch

from prompts import Backbone, SharedPrompt, TaskFactors, encode_shared, encode_task, to_base64
from prompts import load_backbone as _load
from tests.redis_server import free_port

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "admin-secret"
CLIENT_KEY = "client-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
PROMPT_LENGTH = 6


@pytest.fixture(scope="session")
def t5_backbone(tiny_t5_dir: Path) -> Backbone:
    return _load(tiny_t5_dir)


@pytest.fixture(scope="session")
def gpt2_backbone(tiny_gpt2_dir: Path) -> Backbone:
    return _load(tiny_gpt2_dir)


def shared_prompt(
    bb: Backbone,
    sid: str = "family",
    *,
    seed: int = 0,
    length: int = PROMPT_LENGTH,
    backbone: str | None = None,
) -> SharedPrompt:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(length, bb.dim, generator=g)  # [L, d]
    return SharedPrompt(sid, prompt, backbone or bb.fingerprint)


def write_overflowing_task(client: Any, backbone: Backbone, name: str = "poison") -> None:
    """Store a task whose composed prompt overflows (u = v = 1e20) straight into the app's store,
    behind the API's validation: the engine's isolation is what must stop it."""
    tf = TaskFactors(
        name,
        "family",
        torch.full((PROMPT_LENGTH, 1), 1e20),
        torch.full((1, backbone.dim), 1e20),
        backbone.fingerprint,
    )
    backend = client.app.state.store.backend  # not the store: its write gate would refuse it
    client.portal.call(lambda: backend.put_task(name, encode_task(tf), "family", {}, create=True))


def shared_body(sp: SharedPrompt, **extra: Any) -> dict[str, Any]:
    return {"blob": to_base64(encode_shared(sp)), **extra}


def factors(
    bb: Backbone, *, seed: int, length: int = PROMPT_LENGTH, rank: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    u = torch.randn(length, rank, generator=g) * 2  # [L, r]
    v = torch.randn(rank, bb.dim, generator=g)  # [r, d]
    return u, v


def task_body(
    bb: Backbone,
    name: str,
    *,
    seed: int,
    shared: str = "family",
    as_blob: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    u, v = factors(bb, seed=seed)
    if as_blob:
        tf = TaskFactors(name, shared, u, v, bb.fingerprint)
        return {"name": name, "factors": to_base64(encode_task(tf)), **extra}
    return {"name": name, "shared": shared, "u": u.tolist(), "v": v.tolist(), **extra}


@contextlib.contextmanager
def app_client(
    model: Path, bb: Backbone, data_dir: Path, tasks: dict[str, dict[str, Any]], **settings: Any
) -> Iterator[TestClient]:
    """The app in-process on ``model`` (the admin and client keys, WARNING logs, then
    ``settings``) with the shared prompt ``family`` and ``tasks`` ({name: task_body's
    keyword arguments}) registered: the module-scoped client of several test modules."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    options: dict[str, Any] = {
        "admin_keys": [ADMIN_KEY],
        "client_keys": [CLIENT_KEY],
        "log_level": "WARNING",
        **settings,
    }
    app = create_app(Settings(model=str(model), data_dir=str(data_dir), **options))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/shared-prompts", json=shared_body(shared_prompt(bb)), headers=ADMIN)
        assert r.status_code == 201, r.text
        for name, extra in tasks.items():
            r = c.post("/v1/tasks", json=task_body(bb, name, **extra), headers=ADMIN)
            assert r.status_code == 201, r.text
        yield c


class ServerProcess:
    """``rankone serve`` in a subprocess; ``env`` holds RANKONE_* settings."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> ServerProcess:
        log = self.log_path.open("ab")
        cmd = [
            sys.executable,
            "-m",
            "rankone_cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        return self

    def wait_ready(self, timeout: float = 90.0) -> ServerProcess:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.logs()}")

    def start(self, timeout: float = 90.0) -> ServerProcess:
        return self.launch().wait_ready(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[ServerProcess] = []

    def make(env: dict[str, str]) -> ServerProcess:
        server = ServerProcess(env, tmp_path / f"server-{len(started)}.log").start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def server_env(model: Path, **settings: Any) -> dict[str, str]:
    env = {
        "RANKONE_MODEL": str(model),
        "RANKONE_ADMIN_KEYS": ADMIN_KEY,
        "RANKONE_CLIENT_KEYS": CLIENT_KEY,
        "RANKONE_LOG_LEVEL": "WARNING",
    }
    env.update({f"RANKONE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def reference_text(
    bb: Backbone,
    prompt: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    text: str,
    max_new_tokens: int,
) -> str | None:
    """What HF ``generate`` gives for one request alone with its composed prompt (greedy).

    None when a step's top-two logits are within float32 noise of each other (a near tie that
    a batch's different reduction order may legitimately break the other way): such a
    request proves nothing about batching, and the tests skip comparing it.
    """
    from prompts import compose_prompt, prepend_prompts

    ids = torch.tensor([bb.tokenizer(text)["input_ids"]])  # [1, T]
    composed = compose_prompt(prompt, u, v)[None]  # [1, L, d]
    inputs = prepend_prompts(
        bb.embed(ids), torch.ones_like(ids), composed, causal=not bb.is_seq2seq
    )
    with torch.inference_mode():
        out = bb.model.generate(
            inputs_embeds=inputs.inputs_embeds,  # type: ignore[operator]
            attention_mask=inputs.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    seq = out.sequences[0].tolist()
    tokens = seq[1:] if bb.is_seq2seq else seq
    eos = bb.tokenizer.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos) + 1]
    for scores in out.scores[: len(tokens)]:
        top = scores[0].float().topk(2).values
        if float(top[0] - top[1]) <= 1e-5 * float(top.abs().max()) + 1e-4:
            return None
    if tokens and tokens[-1] == eos:
        tokens = tokens[:-1]
    return str(bb.tokenizer.decode(tokens, skip_special_tokens=True))
