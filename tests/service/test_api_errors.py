"""Bad input through the routes (TestClient with the lifespan): each a 4xx with a message that
says what was wrong — never a 500 — and a failed write leaves the previous version intact."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from prompts import Backbone, SharedPrompt, TaskFactors, encode_task, to_base64
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import (
    ADMIN,
    ADMIN_KEY,
    CLIENT,
    CLIENT_KEY,
    PROMPT_LENGTH,
    shared_body,
    shared_prompt,
    task_body,
)


@pytest.fixture(scope="module")
def client(
    tiny_t5_dir: Path, tmp_path_factory: pytest.TempPathFactory, t5_backbone: Backbone
) -> Iterator[TestClient]:
    settings = Settings(
        model=str(tiny_t5_dir),
        data_dir=str(tmp_path_factory.mktemp("data")),
        admin_keys=[ADMIN_KEY],
        client_keys=[CLIENT_KEY],
        max_input_tokens=40,
        max_new_tokens_limit=20,
        max_rank=4,
        max_body_bytes=64 * 1024,
        log_level="WARNING",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert (
            c.post(
                "/v1/shared-prompts", json=shared_body(shared_prompt(t5_backbone)), headers=ADMIN
            ).status_code
            == 201
        )
        assert (
            c.post(
                "/v1/tasks", json=task_body(t5_backbone, "basic", seed=0), headers=ADMIN
            ).status_code
            == 201
        )
        yield c


def expect(response: Any, status: int, *needles: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    for needle in needles:
        assert needle.lower() in error["message"].lower(), (needle, error["message"])
    return error


def test_malformed_json(client: TestClient) -> None:
    r = client.post(
        "/v1/tasks", content=b'{"name": "x",', headers={**ADMIN, "content-type": "application/json"}
    )
    expect(r, 400, "malformed JSON")


def test_missing_field_names_the_field(client: TestClient) -> None:
    expect(client.post("/v1/tasks/basic/generate", json={}, headers=CLIENT), 422, "inputs")


def test_wrong_shapes(client: TestClient, t5_backbone: Backbone) -> None:
    body = task_body(t5_backbone, "shapes", seed=1)
    body["u"] = body["u"][:-1]  # L - 1 rows
    expect(client.post("/v1/tasks", json=body, headers=ADMIN), 422, "do not fit", "expected u")
    body = task_body(t5_backbone, "ragged", seed=1)
    body["v"] = [body["v"][0], body["v"][0][:3]]
    expect(client.post("/v1/tasks", json=body, headers=ADMIN), 422, "v must be")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_refused(client: TestClient, t5_backbone: Backbone, bad: float) -> None:
    u = torch.ones(PROMPT_LENGTH, 1)
    u[2, 0] = bad
    tf = TaskFactors(
        "nonfinite", "family", u, torch.ones(1, t5_backbone.dim), t5_backbone.fingerprint
    )
    blob = to_base64(_raw_task_blob(tf))
    expect(
        client.post("/v1/tasks", json={"name": "nonfinite", "factors": blob}, headers=ADMIN),
        422,
        "NaN or infinite",
    )
    body = task_body(t5_backbone, "nonfinite", seed=1)
    body["u"][0][0] = bad
    r = client.post(
        "/v1/tasks",
        content=_json_with_nonfinite(body),
        headers={**ADMIN, "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text


def _raw_task_blob(tf: TaskFactors) -> bytes:
    """A task blob that skips the encoder's validation (as a hostile client would send)."""
    from safetensors.torch import save

    meta = {
        "format": "rankone/1",
        "kind": "task",
        "name": tf.name,
        "shared": tf.shared,
        "backbone": tf.backbone,
        "created": tf.created,
        "meta": "{}",
    }
    return save({"u": tf.u.contiguous(), "v": tf.v.contiguous()}, metadata=meta)


def _json_with_nonfinite(body: dict[str, Any]) -> bytes:
    import json

    return json.dumps(body).encode()  # Python writes NaN / Infinity literals


def test_rank_too_high(client: TestClient, t5_backbone: Backbone) -> None:
    body = task_body(t5_backbone, "wide", seed=1)
    body["u"] = torch.ones(PROMPT_LENGTH, 5).tolist()
    body["v"] = torch.ones(5, t5_backbone.dim).tolist()
    expect(client.post("/v1/tasks", json=body, headers=ADMIN), 422, "rank 5", "limit 4")


def test_unknown_shared_prompt(client: TestClient, t5_backbone: Backbone) -> None:
    body = task_body(t5_backbone, "orphan", seed=1, shared="nope")
    expect(client.post("/v1/tasks", json=body, headers=ADMIN), 422, "'nope'", "register")


def test_backbone_mismatch(client: TestClient, t5_backbone: Backbone) -> None:
    sp = shared_prompt(t5_backbone, "alien", backbone="gpt2-0000000000000000")
    expect(
        client.post("/v1/shared-prompts", json=shared_body(sp), headers=ADMIN),
        409,
        "backbone",
        "gpt2-0000000000000000",
    )
    tf = TaskFactors(
        "alien-task",
        "family",
        torch.ones(PROMPT_LENGTH, 1),
        torch.ones(1, t5_backbone.dim),
        "gpt2-0000000000000000",
    )
    r = client.post(
        "/v1/tasks",
        json={"name": "alien-task", "factors": to_base64(encode_task(tf))},
        headers=ADMIN,
    )
    expect(r, 409, "backbone")


def test_wrong_width_shared_prompt(client: TestClient, t5_backbone: Backbone) -> None:
    sp = SharedPrompt("narrow", torch.ones(4, 8), t5_backbone.fingerprint)
    expect(client.post("/v1/shared-prompts", json=shared_body(sp), headers=ADMIN), 422, "d=8")


@pytest.mark.parametrize("name", ["../x", "Upper", "-lead", "a" * 65, "a..b", "sp ace"])
def test_bad_names(client: TestClient, t5_backbone: Backbone, name: str) -> None:
    body = task_body(t5_backbone, "x", seed=1)
    body["name"] = name
    expect(client.post("/v1/tasks", json=body, headers=ADMIN), 422, "invalid task name")


def test_bad_name_in_path(client: TestClient) -> None:
    r = client.post("/v1/tasks/..%2Fx/generate", json={"inputs": "hi"}, headers=CLIENT)
    assert r.status_code in (404, 422), r.text
    assert "error" in r.json()


def test_bad_base64_and_corrupt_blob(client: TestClient) -> None:
    expect(client.post("/v1/shared-prompts", json={"blob": "@@@"}, headers=ADMIN), 422, "base64")
    junk = base64.b64encode(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header").decode()
    expect(
        client.post("/v1/shared-prompts", json={"blob": junk}, headers=ADMIN), 422, "safetensors"
    )


def test_oversized_body(client: TestClient) -> None:
    big = b'{"blob": "' + b"A" * (70 * 1024) + b'"}'
    r = client.post(
        "/v1/shared-prompts", content=big, headers={**ADMIN, "content-type": "application/json"}
    )
    expect(r, 413, "65536 bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the byte counter must stop it
        yield b'{"blob": "'
        for _ in range(80):
            yield b"A" * 1024
        yield b'"}'

    r = client.post(
        "/v1/shared-prompts",
        content=chunks(),
        headers={**ADMIN, "content-type": "application/json"},
    )
    expect(r, 413, "limit")


def test_too_many_input_tokens(client: TestClient) -> None:
    r = client.post("/v1/tasks/basic/generate", json={"inputs": "x" * 100}, headers=CLIENT)
    expect(r, 422, "limit is 40 tokens")


def test_max_new_tokens_over_limit(client: TestClient) -> None:
    r = client.post(
        "/v1/tasks/basic/generate",
        json={"inputs": "hi", "parameters": {"max_new_tokens": 21}},
        headers=CLIENT,
    )
    expect(r, 422, "limit of 20")
    r = client.post(
        "/v1/completions", json={"model": "basic", "prompt": "hi", "max_tokens": 50}, headers=CLIENT
    )
    expect(r, 422, "limit of 20")


def test_unknown_task(client: TestClient) -> None:
    expect(
        client.post("/v1/tasks/ghost/generate", json={"inputs": "hi"}, headers=CLIENT), 404, "ghost"
    )
    expect(
        client.post("/v1/completions", json={"model": "ghost", "prompt": "hi"}, headers=CLIENT),
        404,
        "ghost",
    )
    expect(client.get("/v1/tasks/ghost", headers=ADMIN), 404, "ghost")
    expect(client.delete("/v1/tasks/ghost", headers=ADMIN), 404, "ghost")


def test_duplicate_create(client: TestClient, t5_backbone: Backbone) -> None:
    expect(
        client.post("/v1/tasks", json=task_body(t5_backbone, "basic", seed=3), headers=ADMIN),
        409,
        "basic",
    )


def test_auth(client: TestClient) -> None:
    gen = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
    expect(client.post("/v1/tasks/basic/generate", json=gen), 401, "missing API key")
    expect(
        client.post("/v1/tasks/basic/generate", json=gen, headers={"Authorization": "Bearer nope"}),
        401,
        "invalid API key",
    )
    expect(client.get("/v1/tasks", headers=CLIENT), 403, "admin key")
    expect(client.get("/v1/tasks"), 401, "missing")
    assert client.post("/v1/tasks/basic/generate", json=gen, headers=ADMIN).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code == 200


def test_openai_unsupported_options(client: TestClient) -> None:
    expect(
        client.post(
            "/v1/completions", json={"model": "basic", "prompt": "hi", "n": 2}, headers=CLIENT
        ),
        422,
        "n=1",
    )


def test_failed_replace_keeps_previous_version(client: TestClient, t5_backbone: Backbone) -> None:
    gen = {"inputs": "hello", "parameters": {"max_new_tokens": 5}}
    before = client.post("/v1/tasks/basic/generate", json=gen, headers=CLIENT).json()
    info = client.get("/v1/tasks/basic", headers=ADMIN).json()
    bad = task_body(t5_backbone, "basic", seed=9)
    del bad["name"]
    bad["u"] = bad["u"][:2]
    expect(client.put("/v1/tasks/basic", json=bad, headers=ADMIN), 422)
    expect(client.put("/v1/tasks/basic", json={"factors": "!!!"}, headers=ADMIN), 422)
    assert client.get("/v1/tasks/basic", headers=ADMIN).json() == info
    after = client.post("/v1/tasks/basic/generate", json=gen, headers=CLIENT).json()
    assert after["texts"] == before["texts"] and after["version"] == info["version"]


def test_replace_bumps_version_and_get_shows_shapes(
    client: TestClient, t5_backbone: Backbone
) -> None:
    body = task_body(
        t5_backbone, "versioned", seed=4, description="first", parameters={"max_new_tokens": 3}
    )
    assert client.post("/v1/tasks", json=body, headers=ADMIN).status_code == 201
    put = task_body(t5_backbone, "versioned", seed=5, as_blob=True, description="second")
    del put["name"]
    r = client.put("/v1/tasks/versioned", json=put, headers=ADMIN)
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    got = client.get("/v1/tasks/versioned", headers=ADMIN).json()
    assert (got["rank"], got["length"], got["dim"]) == (1, PROMPT_LENGTH, t5_backbone.dim)
    assert got["description"] == "second" and "u" not in got
    full = client.get("/v1/tasks/versioned?include_factors=true", headers=ADMIN).json()
    assert len(full["u"]) == PROMPT_LENGTH and len(full["v"][0]) == t5_backbone.dim
    page = client.get("/v1/tasks?offset=0&limit=1", headers=ADMIN).json()
    assert page["total"] >= 2 and len(page["tasks"]) == 1 and page["next_offset"] == 1
    shared = client.get("/v1/shared-prompts/family", headers=ADMIN).json()
    assert (shared["length"], shared["dim"]) == (PROMPT_LENGTH, t5_backbone.dim)
    assert [
        s["id"] for s in client.get("/v1/shared-prompts", headers=ADMIN).json()["shared_prompts"]
    ] == ["family"]


def test_task_default_parameters_apply(client: TestClient, t5_backbone: Backbone) -> None:
    body = task_body(t5_backbone, "short", seed=6, parameters={"max_new_tokens": 2})
    assert client.post("/v1/tasks", json=body, headers=ADMIN).status_code == 201
    out = client.post("/v1/tasks/short/generate", json={"inputs": "hello"}, headers=CLIENT).json()[
        "outputs"
    ][0]
    assert out["completion_tokens"] <= 2


def test_shared_prompt_create_conflict_then_replace(
    client: TestClient, t5_backbone: Backbone
) -> None:
    sp = shared_prompt(t5_backbone, "other", seed=3)
    assert client.post("/v1/shared-prompts", json=shared_body(sp), headers=ADMIN).status_code == 201
    expect(client.post("/v1/shared-prompts", json=shared_body(sp), headers=ADMIN), 409)
    r = client.put("/v1/shared-prompts/other", json=shared_body(sp), headers=ADMIN)
    assert r.status_code == 200 and r.json()["version"] == 2
    expect(
        client.put("/v1/shared-prompts/wrong-id", json=shared_body(sp), headers=ADMIN), 422, "URL"
    )
    sp2 = SharedPrompt("other", torch.ones(3, t5_backbone.dim), t5_backbone.fingerprint)
    expect(
        client.post("/v1/shared-prompts", json=shared_body(sp2, replace=True), headers=ADMIN),
        409,
        "shape",
    )


def test_draining_server_refuses_new_work(client: TestClient) -> None:
    state = client.app.state  # type: ignore[attr-defined]
    state.draining = True
    try:
        expect(
            client.post("/v1/tasks/basic/generate", json={"inputs": "hi"}, headers=CLIENT),
            503,
            "shutting down",
        )
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
    finally:
        state.draining = False
