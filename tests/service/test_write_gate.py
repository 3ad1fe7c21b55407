"""One write gate: a task write is validated once, in the store, against the shared prompt the
server holds, and every writer passes it: what ``POST /v1/tasks`` refuses, seeding refuses."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import prompts.artifacts
from prompts import Backbone, TaskFactors, save_shared, save_task
from prompts.errors import ArtifactError
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import (
    ADMIN,
    ADMIN_KEY,
    PROMPT_LENGTH,
    shared_body,
    shared_prompt,
    task_body,
)


def _settings(model: Path, data: Path, **extra: Any) -> Settings:
    return Settings(
        model=str(model), data_dir=str(data), admin_keys=[ADMIN_KEY], log_level="WARNING", **extra
    )


@pytest.fixture(scope="module")
def client(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = _settings(tiny_gpt2_dir, tmp_path_factory.mktemp("data"))
    with TestClient(create_app(settings)) as c:
        yield c


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[str]:
    """Count the calls of ``prompts.artifacts.<name>`` (encode and decode call it there)."""
    calls: list[str] = []
    original: Callable[..., Any] = getattr(prompts.artifacts, name)

    def counted(artifact: Any, **kw: Any) -> Any:
        calls.append(getattr(artifact, "name", getattr(artifact, "id", "?")))
        return original(artifact, **kw)

    monkeypatch.setattr(prompts.artifacts, name, counted)
    return calls


def test_one_validation_per_write(
    client: TestClient, gpt2_backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared_upload = shared_body(shared_prompt(gpt2_backbone))  # encoded here, not counted
    blob = task_body(gpt2_backbone, "blob", seed=1, as_blob=True)
    shared = _counting(monkeypatch, "validate_shared")
    tasks = _counting(monkeypatch, "validate_task")
    assert client.post("/v1/shared-prompts", json=shared_upload, headers=ADMIN).status_code == 201
    assert shared == ["family"]
    assert client.post("/v1/tasks", json=blob, headers=ADMIN).status_code == 201
    assert tasks == ["blob"]  # once per blob upload (it was four times)
    body = task_body(gpt2_backbone, "json", seed=2)
    assert client.post("/v1/tasks", json=body, headers=ADMIN).status_code == 201
    body.pop("name")
    assert client.put("/v1/tasks/json", json=body, headers=ADMIN).status_code == 200
    assert tasks == ["blob", "json", "json"]


def _overlong(bb: Backbone, name: str) -> TaskFactors:
    """Finite factors whose composed rows are ~1e12 times a prompt row: past the norm bound."""
    u = torch.full((PROMPT_LENGTH, 1), 1e6)
    v = torch.full((1, bb.dim), 1e6)
    return TaskFactors(name, "family", u, v, bb.fingerprint)


def test_seeding_refuses_what_post_refuses(
    client: TestClient, gpt2_backbone: Backbone, tiny_gpt2_dir: Path, tmp_path: Path
) -> None:
    tf = _overlong(gpt2_backbone, "huge")
    if client.get("/v1/shared-prompts/family", headers=ADMIN).status_code == 404:
        sp = shared_prompt(gpt2_backbone)
        client.post("/v1/shared-prompts", json=shared_body(sp), headers=ADMIN)
    body = {"name": "huge", "shared": "family", "u": tf.u.tolist(), "v": tf.v.tolist()}
    refused = client.post("/v1/tasks", json=body, headers=ADMIN)
    assert refused.status_code == 422 and "composed prompt" in refused.json()["error"]["message"]

    seed, data = tmp_path / "seed", tmp_path / "data"
    save_shared(seed, shared_prompt(gpt2_backbone))
    save_task(seed, tf)  # a valid artifact file: only the composed-norm bound refuses it
    app = create_app(_settings(tiny_gpt2_dir, data, seed_dir=str(seed)))
    with (
        pytest.raises(ArtifactError, match=r"huge\.safetensors: .*composed prompt"),
        TestClient(app),
    ):
        pass
    # refused before anything was written: not even the seed's (valid) shared prompt
    assert not list(data.glob("*/*.safetensors"))
