"""What the console reads besides the registry itself, through the routes: a task's version
history (``GET /v1/tasks/{name}/versions``), the name search of ``GET /v1/tasks?q=``, and the
per-task traffic series of ``/metrics`` with their bounded labels."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from prompts import Backbone
from service.handlers.registry import MAX_HISTORY
from service.metrics import OTHER_TASKS, TaskTraffic
from tests.service.conftest import (
    ADMIN,
    ADMIN_KEY,
    CLIENT,
    app_client,
    task_body,
)


@pytest.fixture(scope="module")
def client(
    tiny_gpt2_dir: Path, gpt2_backbone: Backbone, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    tasks = {
        name: {"seed": seed, "description": f"{name} v1"}
        for seed, name in enumerate(["first", "second", "team-x"])
    }
    with app_client(
        tiny_gpt2_dir,
        gpt2_backbone,
        tmp_path_factory.mktemp("views"),
        tasks,
        admin_keys=[ADMIN_KEY, "team-key:team-*"],
        metrics_task_labels=1,
        finetune_worker="off",
    ) as c:
        yield c


def put(c: TestClient, bb: Backbone, name: str, seed: int, **extra: object) -> None:
    body = {**task_body(bb, name, seed=seed, **extra), "name": None}
    r = c.put(f"/v1/tasks/{name}", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text


def test_versions_newest_first_with_what_each_was(
    client: TestClient, gpt2_backbone: Backbone
) -> None:
    put(client, gpt2_backbone, "second", 5, description="second v2")
    put(client, gpt2_backbone, "second", 6)  # keeps the description of v2
    got = client.get("/v1/tasks/second/versions", headers=ADMIN).json()
    assert got["kept"] == MAX_HISTORY
    assert [(v["version"], v["description"]) for v in got["versions"]] == [
        (3, "second v2"),
        (2, "second v2"),
        (1, "second v1"),
    ]
    assert {(v["shared"], v["rank"]) for v in got["versions"]} == {("family", 1)}
    # the history is the record's own, not a field of the task's JSON
    assert "history" not in client.get("/v1/tasks/second", headers=ADMIN).json()


def test_versions_are_bounded(client: TestClient, gpt2_backbone: Backbone) -> None:
    for seed in range(MAX_HISTORY + 2):
        put(client, gpt2_backbone, "first", seed)
    versions = client.get("/v1/tasks/first/versions", headers=ADMIN).json()["versions"]
    assert len(versions) == MAX_HISTORY + 1
    assert versions[0]["version"] == MAX_HISTORY + 3 and versions[-1]["version"] == 3


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/v1/tasks/nope/versions", ADMIN, 404),
        ("/v1/tasks/Bad%20Name/versions", ADMIN, 422),
        ("/v1/tasks/first/versions", CLIENT, 403),
        ("/v1/tasks/first/versions", {"Authorization": "Bearer team-key"}, 403),
        ("/v1/tasks/first/versions", {}, 401),
        ("/v1/tasks?q=", ADMIN, 422),
        (f"/v1/tasks?q={'x' * 65}", ADMIN, 422),
    ],
)
def test_bad_views_are_clear_4xx(
    client: TestClient, path: str, headers: dict[str, str], status: int
) -> None:
    r = client.get(path, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_search_by_name_pages_within_the_matches(client: TestClient) -> None:
    def names(query: str, key: dict[str, str] = ADMIN) -> tuple[list[str], int]:
        page = client.get(f"/v1/tasks?{query}", headers=key).json()
        return [t["name"] for t in page["tasks"]], page["total"]

    assert names("q=s") == (["first", "second"], 2)
    assert names("q=s&limit=1&offset=1") == (["second"], 2)
    assert names("q=team") == (["team-x"], 1)
    assert names("q=nothing") == ([], 0)
    # a scoped key searches within its scope
    assert names("q=s", {"Authorization": "Bearer team-key"}) == ([], 0)


def samples(client: TestClient, series: str) -> dict[tuple[str, ...], float]:
    text = client.get("/metrics").text
    found = {}
    for labels, value in re.findall(rf"^{series}\{{(.*)\}} (\S+)$", text, flags=re.M):
        found[tuple(re.findall(r'"([^"]*)"', labels))] = float(value)
    return found


def test_per_task_traffic_with_bounded_labels(client: TestClient) -> None:
    for name, stream in (("first", False), ("first", True), ("second", False)):
        r = client.post(
            f"/v1/tasks/{name}/generate",
            json={"inputs": "hello", "parameters": {"max_new_tokens": 3}, "stream": stream},
            headers=CLIENT,
        )
        assert r.status_code == 200, r.text
    assert client.post("/v1/tasks/ghost/generate", json={"inputs": "x"}, headers=CLIENT).is_error
    requests = samples(client, "rankone_task_requests_total")
    # the label limit is 1: 'first' was seen first, 'second' counts as _other, 'ghost' nowhere
    assert requests == {("ok", "first"): 2.0, ("ok", OTHER_TASKS): 1.0}  # (outcome, task)
    assert samples(client, "rankone_task_generated_tokens_total")[("first",)] == 6.0
    assert samples(client, "rankone_task_prompt_tokens_total")[("first",)] > 0
    assert "rankone_task_labels_limit 1.0" in client.get("/metrics").text


def test_task_traffic_counts_errors_and_can_be_off() -> None:
    traffic = TaskTraffic(CollectorRegistry())
    traffic.ok("a", 3, 4)  # off (limit 0): nothing is counted
    traffic.configure(2)
    traffic.error("a", 2)
    traffic.ok("b", 1, 1)
    traffic.ok("c", 1, 1)
    assert traffic.requests.labels(task="a", outcome="error")._value.get() == 2
    assert traffic.requests.labels(task="a", outcome="ok")._value.get() == 0
    assert traffic.requests.labels(task=OTHER_TASKS, outcome="ok")._value.get() == 1
