"""Registry bodies a new user writes by hand: JSON shared prompts, flat rank-one factors, PUT
with the POST body, non-JSON bodies, bad names on the generate URL, seeded fingerprints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prompts import Backbone, save_shared
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import ADMIN, ADMIN_KEY, PROMPT_LENGTH, shared_prompt, task_body


@pytest.fixture(scope="module")
def client(
    tiny_t5_dir: Path, tmp_path_factory: pytest.TempPathFactory, t5_backbone: Backbone
) -> Iterator[TestClient]:
    seed = tmp_path_factory.mktemp("seed")
    save_shared(seed, shared_prompt(t5_backbone, "seeded"))
    settings = Settings(
        model=str(tiny_t5_dir),
        data_dir=str(tmp_path_factory.mktemp("data")),
        seed_dir=str(seed),
        admin_keys=[ADMIN_KEY],
        log_level="WARNING",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def error(response: Any, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    return dict(response.json()["error"])


def test_seeded_shared_prompt_shows_its_fingerprint(client: TestClient, t5_backbone: Backbone):
    info = client.get("/v1/shared-prompts/seeded", headers=ADMIN).json()
    assert info["backbone"] == t5_backbone.fingerprint
    assert "blob" not in info
    assert client.get("/v1/shared-prompts/seeded?include_blob=true", headers=ADMIN).json()["blob"]


def test_json_shared_prompt_needs_an_id_and_one_source(client: TestClient, t5_backbone: Backbone):
    rows = [[0.1] * t5_backbone.dim] * PROMPT_LENGTH
    err = error(client.post("/v1/shared-prompts", json={"prompt": rows}, headers=ADMIN), 422)
    assert "id is required with prompt" in err["message"]
    err = error(client.post("/v1/shared-prompts", json={"id": "x"}, headers=ADMIN), 422)
    assert "give either blob" in err["message"]
    ok = client.put("/v1/shared-prompts/json-sp", json={"prompt": rows}, headers=ADMIN)
    assert ok.status_code == 200, ok.text
    assert ok.json()["backbone"] == t5_backbone.fingerprint


def test_put_takes_the_post_body_and_keeps_defaults(client: TestClient, t5_backbone: Backbone):
    client.put(
        "/v1/shared-prompts/family",
        json={"prompt": [[0.2] * t5_backbone.dim] * PROMPT_LENGTH},
        headers=ADMIN,
    )
    body = task_body(t5_backbone, "put-me", seed=1, parameters={"temperature": 0.5})
    body["description"] = "first"
    assert client.post("/v1/tasks", json=body, headers=ADMIN).status_code == 201
    err = error(client.post("/v1/tasks", json=body, headers=ADMIN), 409)
    assert "PUT /v1/tasks/put-me" in err["message"]
    again = task_body(t5_backbone, "put-me", seed=2)  # the POST body, name included
    put = client.put("/v1/tasks/put-me", json=again, headers=ADMIN)
    assert put.status_code == 200, put.text
    info = put.json()
    assert (info["version"], info["description"]) == (2, "first")
    assert info["parameters"] == {"temperature": 0.5}
    err = error(client.put("/v1/tasks/other-name", json=again, headers=ADMIN), 422)
    assert "the URL says 'other-name'" in err["message"]


def test_bad_name_on_generate_url_is_a_name_error(client: TestClient):
    err = error(client.post("/v1/tasks/Not_Valid!/generate", json={"inputs": "a"}), 422)
    assert err["code"] == "invalid_name" and "invalid task name" in err["message"]


def test_body_without_json_content_type_says_so(client: TestClient):
    response = client.post(
        "/v1/tasks/any/generate",
        content=b'{"inputs": "a"}',
        headers={"Content-Type": "text/plain"},
    )
    err = error(response, 422)
    assert "Content-Type: application/json" in err["message"] and "text/plain" in err["message"]
