"""The zero-setup server: the embedded directory store survives a restart; a GPT-2 backbone
serves through the same routes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from prompts import Backbone
from service.app import create_app
from service.engine import one_row
from service.settings import Settings
from tests.service.conftest import (
    ADMIN,
    CLIENT,
    factors,
    reference_text,
    server_env,
    shared_body,
    shared_prompt,
    task_body,
)


def register(url: str, backbone: Backbone, task: str) -> None:
    """The shared prompt ``family`` and one task over it (factors of seed 3), through HTTP."""
    r = httpx.post(
        f"{url}/v1/shared-prompts", json=shared_body(shared_prompt(backbone)), headers=ADMIN
    )
    assert r.status_code == 201, r.text
    r = httpx.post(f"{url}/v1/tasks", json=task_body(backbone, task, seed=3), headers=ADMIN)
    assert r.status_code == 201, r.text


def test_embedded_store_survives_restart(
    server_factory: Any, tiny_t5_dir: Path, tmp_path: Path, t5_backbone: Backbone
) -> None:
    env = server_env(tiny_t5_dir, data_dir=tmp_path / "store")
    first = server_factory(env)
    register(first.url, t5_backbone, "kept")
    first.stop()
    second = server_factory(env)
    info = httpx.get(f"{second.url}/v1/tasks/kept", headers=ADMIN).json()
    assert info["version"] == 1 and info["shared"] == "family"
    r = httpx.post(
        f"{second.url}/v1/tasks/kept/generate",
        headers=CLIENT,
        timeout=60,
        json={"inputs": "hello", "parameters": {"max_new_tokens": 6}},
    )
    assert r.status_code == 200, r.text
    u, v = factors(t5_backbone, seed=3)
    expected = reference_text(t5_backbone, shared_prompt(t5_backbone).prompt, u, v, "hello", 6)
    assert expected is None or r.json()["texts"] == [expected]
    assert httpx.get(f"{second.url}/v1/info", headers=CLIENT).json()["store"] == "embedded"


def _gpt2_client(model: Path, data: Path) -> Iterator[TestClient]:
    settings = Settings(model=str(model), data_dir=str(data), log_level="WARNING")
    with TestClient(create_app(settings)) as client:
        yield client


def test_gpt2_backbone_serves(tiny_gpt2_dir: Path, tmp_path: Path, gpt2_backbone: Backbone) -> None:
    for c in _gpt2_client(tiny_gpt2_dir, tmp_path):
        sp = shared_prompt(gpt2_backbone)
        assert c.post("/v1/shared-prompts", json=shared_body(sp)).status_code == 201
        for i in range(2):
            body = task_body(gpt2_backbone, f"g{i}", seed=i)
            assert c.post("/v1/tasks", json=body).status_code == 201
        for i, text in enumerate(["the quick brown fox", "hello"]):
            r = c.post(
                f"/v1/tasks/g{i}/generate",
                json={"inputs": [text, "a b c"], "parameters": {"max_new_tokens": 6}},
            )
            assert r.status_code == 200, r.text
            u, v = factors(gpt2_backbone, seed=i)
            expected = reference_text(gpt2_backbone, sp.prompt, u, v, text, 6)
            assert expected is None or r.json()["texts"][0] == expected
        r = c.post(
            "/v1/completions",
            json={"model": "g0", "prompt": "hello", "max_tokens": 3, "temperature": 0.8, "seed": 5},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        assert c.get("/v1/info").json()["backbone"]["kind"] == "causal"


def test_seed_dir_and_continuous_engine(
    tiny_t5_dir: Path, tmp_path: Path, t5_backbone: Backbone
) -> None:
    """Artifacts from a trainer's output directory are served at start, by either engine."""
    from prompts import TaskFactors, save_shared, save_task

    sp = shared_prompt(t5_backbone)
    save_shared(tmp_path / "seed", sp)
    u, v = factors(t5_backbone, seed=11)
    save_task(tmp_path / "seed", TaskFactors("seeded", "family", u, v, t5_backbone.fingerprint))
    expected = reference_text(t5_backbone, sp.prompt, u, v, "hello there", 6)
    for engine in ("continuous", "static"):
        settings = Settings(
            model=str(tiny_t5_dir),
            data_dir=str(tmp_path / engine),
            seed_dir=str(tmp_path / "seed"),
            engine=engine,
            log_level="WARNING",
        )
        with TestClient(create_app(settings)) as c:
            info = c.get("/v1/info").json()
            assert info["engine"] == engine and info["forward"] == "hf"  # T5: not fused
            assert info["kernels"] == "torch"
            r = c.post(
                "/v1/tasks/seeded/generate",
                json={"inputs": ["hello there", "a"], "parameters": {"max_new_tokens": 6}},
            )
            assert r.status_code == 200, r.text
            assert expected is None or r.json()["texts"][0] == expected
            with c.stream(
                "POST",
                "/v1/tasks/seeded/generate",
                json={"inputs": "hello there", "stream": True, "parameters": {"max_new_tokens": 6}},
            ) as s:
                events = [line for line in s.iter_lines() if line.startswith("event:")]
            assert events[-1] == "event: done"


def test_a_client_that_hangs_up_frees_its_rows(
    server_factory: Any, tiny_t5_dir: Path, tmp_path: Path, t5_backbone: Backbone
) -> None:
    """Through uvicorn: a non-streaming request whose client closes the connection is
    cancelled (the server waits for the ASGI ``http.disconnect``, no polling), long before its
    rows reach their token limit."""
    env = server_env(
        tiny_t5_dir, data_dir=tmp_path / "store", max_new_tokens_limit=100_000, max_batch_size=4
    )
    server = server_factory(env)
    register(server.url, t5_backbone, "long")
    limit = 50_000  # T5's relative positions have no table to run out of
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(
            f"{server.url}/v1/tasks/long/generate",
            headers=CLIENT,
            timeout=httpx.Timeout(10.0, read=1.5),
            json={
                "inputs": ["a", "b c", "d e f", "g"],
                "parameters": {"max_new_tokens": limit},
            },
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = _metrics(server.url)
        if metrics.get("rankone_running_requests", 1) == 0:
            break
        time.sleep(0.2)
    assert metrics.get("rankone_running_requests") == 0
    assert metrics['rankone_finished_requests_total{reason="cancelled"}'] == 4
    assert metrics["rankone_generated_tokens_total"] < 4 * limit / 10


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.parametrize(
    ("fused", "weights", "kind"),
    [
        (True, "float32", "fused"),
        (False, "float32", "hf"),
        (True, "int8", "fused-int8"),
        (True, "int4", "fused-int4"),
        (True, "bfloat16", "fused-bf16"),
        (True, "float32-packed", "fused-f32-packed"),
    ],
)
def test_fused_forward_setting_picks_the_forward(
    tiny_llama_dir: Path, tmp_path: Path, fused: bool, weights: str, kind: str
) -> None:
    """A Llama backbone runs the fused forward unless RANKONE_FUSED_FORWARD is false, reading
    the weights RANKONE_WEIGHTS names; each serves."""
    settings = Settings(
        model=str(tiny_llama_dir),
        data_dir=str(tmp_path),
        fused_forward=fused,
        weights=weights,  # type: ignore[arg-type]
        log_level="WARNING",
    )
    with TestClient(create_app(settings)) as c:
        info = c.get("/v1/info").json()
        assert info["forward"] == kind
        # rankone's own kernels where the fused forward runs on a CPU they build for
        assert info["kernels"] == ("rankone" if fused and one_row.load() is None else "torch")
        c.post("/v1/shared-prompts", json=shared_body(shared_prompt(c.app.state.backbone)))
        r = c.post("/v1/tasks", json=task_body(c.app.state.backbone, "t", seed=3))
        assert r.status_code == 201, r.text
        r = c.post(
            "/v1/tasks/t/generate", json={"inputs": ["hello"], "parameters": {"max_new_tokens": 4}}
        )
        assert r.status_code == 200 and len(r.json()["texts"]) == 1, r.text
    if fused:  # ... unless RANKONE_CPU_KERNELS turns them off
        off = settings.model_copy(update={"cpu_kernels": False, "data_dir": str(tmp_path / "off")})
        with TestClient(create_app(off)) as c:
            info = c.get("/v1/info").json()
            assert info["forward"] == kind and info["kernels"] == "torch"
