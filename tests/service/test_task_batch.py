"""``POST /v1/tasks:batch``: per-task results with exactly the checks of ``POST /v1/tasks``,
over both stores (Redis writes the batch in one pipelined round trip)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prompts import Backbone, TaskFactors, encode_task, to_base64
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import (
    ADMIN,
    ADMIN_KEY,
    PROMPT_LENGTH,
    factors,
    shared_body,
    shared_prompt,
    task_body,
)

SCOPED = {"Authorization": "Bearer scoped-admin"}


@pytest.fixture(params=["embedded", "redis"])
def client(
    request: pytest.FixtureRequest, tiny_t5_dir: Path, tmp_path: Path, t5_backbone: Backbone
) -> Iterator[TestClient]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
    settings = Settings(
        model=str(tiny_t5_dir),
        data_dir=str(tmp_path / "data"),
        redis_url=redis_url,
        admin_keys=[ADMIN_KEY, "scoped-admin:team-*"],
        log_level="WARNING",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        sp = shared_prompt(t5_backbone)
        assert c.post("/v1/shared-prompts", json=shared_body(sp), headers=ADMIN).status_code == 201
        yield c


def bad_bodies(bb: Backbone) -> dict[str, dict[str, Any]]:
    """Bodies ``POST /v1/tasks`` refuses, one per check."""
    u, v = factors(bb, seed=9)
    other = TaskFactors("team-other-bb", "family", u, v, "another-backbone")
    return {
        "exists": task_body(bb, "team-exists", seed=1),
        "shape": {**task_body(bb, "team-shape", seed=2), "u": u[:-1].tolist()},
        "unknown-shared": task_body(bb, "team-unknown", seed=3, shared="nope"),
        "backbone": {"name": "team-other-bb", "factors": to_base64(encode_task(other))},
        "name": task_body(bb, "Bad_Name", seed=4),
        "overflow": {**task_body(bb, "team-huge", seed=5), "u": [[1e30]] * PROMPT_LENGTH},
    }


def test_a_batch_gives_each_task_the_answer_of_a_single_create(
    client: TestClient, t5_backbone: Backbone
) -> None:
    bb = t5_backbone
    assert client.post("/v1/tasks", json=task_body(bb, "team-exists", seed=1), headers=ADMIN)
    bad = bad_bodies(bb)
    good = [task_body(bb, "team-a", seed=10), task_body(bb, "team-b", seed=11, as_blob=True)]
    bodies = [good[0], *bad.values(), good[1], task_body(bb, "team-a", seed=12)]
    r = client.post("/v1/tasks:batch", json={"tasks": bodies}, headers=ADMIN)
    assert r.status_code == 200, r.text
    out = r.json()
    results = out["results"]
    assert [x["name"] for x in results] == [b["name"] for b in bodies]  # request order
    assert (out["created"], out["failed"]) == (2, len(bad) + 1)
    assert results[0]["status"] == 201 and results[0]["task"]["version"] == 1
    assert results[-2]["status"] == 201 and results[-2]["task"]["name"] == "team-b"
    # a name twice in one batch: the second is a conflict, like a second POST
    assert (
        results[-1]["status"] == 409 and "PUT /v1/tasks/team-a" in results[-1]["error"]["message"]
    )

    # every refused item got what POST /v1/tasks answers for that body alone, and nothing of
    # it was written (a single create of it still gives the same answer)
    for item, (label, body) in zip(results[1:-2], bad.items(), strict=True):
        single = client.post("/v1/tasks", json=body, headers=ADMIN)
        assert item["status"] == single.status_code, (label, item, single.text)
        assert item["error"]["code"] == single.json()["error"]["code"], label
        if label != "exists":
            assert item["error"]["message"] == single.json()["error"]["message"], label
        assert "task" not in item
    codes = {label: item["error"]["code"] for item, label in zip(results[1:-2], bad, strict=True)}
    assert codes == {
        "exists": "conflict",
        "shape": "invalid_artifact",
        "unknown-shared": "unknown_shared_prompt",
        "backbone": "backbone_mismatch",
        "name": "invalid_name",
        "overflow": "invalid_artifact",
    }
    names = [t["name"] for t in client.get("/v1/tasks", headers=ADMIN).json()["tasks"]]
    assert names == ["team-a", "team-b", "team-exists"]
    got = client.get("/v1/tasks/team-a?include_factors=true", headers=ADMIN).json()
    assert got["u"] == good[0]["u"]  # the first body's factors, not the duplicate's

    # a scoped admin key: outside its scope is that item's 403
    scoped = [task_body(bb, "team-c", seed=13), task_body(bb, "other-x", seed=14)]
    r = client.post("/v1/tasks:batch", json={"tasks": scoped}, headers=SCOPED)
    assert [x["status"] for x in r.json()["results"]] == [201, 403]
    assert client.get("/v1/tasks/other-x", headers=ADMIN).status_code == 404


def test_a_malformed_batch_is_refused_whole(client: TestClient, t5_backbone: Backbone) -> None:
    bodies = [task_body(t5_backbone, f"t{i}", seed=i) for i in range(3)]
    bodies[2]["u"] = "not a matrix"
    r = client.post("/v1/tasks:batch", json={"tasks": bodies}, headers=ADMIN)
    assert r.status_code == 422 and "tasks.2.u" in r.json()["error"]["message"], r.text
    assert client.get("/v1/tasks", headers=ADMIN).json()["total"] == 0
    for body in ({"tasks": []}, {"tasks": [{"name": "x", "factors": "AA=="}] * 1001}, {}):
        r = client.post("/v1/tasks:batch", json=body, headers=ADMIN)
        assert r.status_code == 422, r.text
    assert client.post("/v1/tasks:batch", json={"tasks": bodies[:1]}).status_code == 401
