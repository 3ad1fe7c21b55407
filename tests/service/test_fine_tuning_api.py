"""Files and fine-tuning jobs through the routes (TestClient), on both job backends.

The worker protocol is driven by hand here (claim, renew, progress, result), so every state
change — lease expiry, retries, cancel, fencing of a stale worker, idempotent registration —
is checked without training anything; tests/trainer/test_worker.py runs the real worker.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from prompts import Backbone, SharedPrompt, TaskFactors, encode_shared, encode_task, to_base64
from service.app import create_app
from service.jobs import lifecycle
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

GOOD = b'{"input": "a", "target": "b"}\n\n{"input": "c", "target": "d"}\n'


def jsonl(rows: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@pytest.fixture(params=["embedded", "redis"], scope="module")
def client(
    request: pytest.FixtureRequest,
    tiny_gpt2_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    gpt2_backbone: Backbone,
) -> Iterator[TestClient]:
    redis_url = ""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        redis_url = server.url.rsplit("/", 1)[0] + "/7"  # a database of its own
        import redis

        redis.Redis.from_url(redis_url).flushdb()
    settings = Settings(
        model=str(tiny_gpt2_dir),
        data_dir=str(tmp_path_factory.mktemp("data")),
        redis_url=redis_url,
        admin_keys=[ADMIN_KEY, "team-key:team-*"],
        client_keys=[CLIENT_KEY],
        finetune_worker="off",
        finetune_max_file_bytes=4096,
        finetune_max_examples=50,
        finetune_max_steps=500,
        finetune_max_attempts=2,
        log_level="WARNING",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        c.app.state.test_settings = settings
        assert c.post(
            "/v1/shared-prompts", json=shared_body(shared_prompt(gpt2_backbone)), headers=ADMIN
        ).status_code in (200, 201)
        c.post("/v1/tasks", json=task_body(gpt2_backbone, "taken", seed=0), headers=ADMIN)
        yield c


def upload(c: TestClient, content: bytes, purpose: str = "fine-tune") -> Any:
    return c.post(
        "/v1/files",
        files={"file": ("train.jsonl", content)},
        data={"purpose": purpose},
        headers=ADMIN,
    )


def error_of(response: Any, status: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    message: str = response.json()["error"]["message"]
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def new_job(c: TestClient, suffix: str, **extra: Any) -> dict[str, Any]:
    file_id = upload(c, GOOD).json()["id"]
    body = {"model": "family", "training_file": file_id, "suffix": suffix, **extra}
    r = c.post("/v1/fine_tuning/jobs", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def claim(c: TestClient, **extra: Any) -> dict[str, Any]:
    r = c.post("/v1/fine_tuning/claims", json={"worker": "w1", **extra}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def drain(c: TestClient) -> None:
    """Cancel whatever an earlier test left queued, so claims see only this test's jobs."""
    for job in c.get("/v1/fine_tuning/jobs?limit=1000", headers=ADMIN).json()["data"]:
        if job["status"] in ("queued", "running"):
            c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=ADMIN)


def factors_b64(bb: Backbone, name: str) -> str:
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(PROMPT_LENGTH, 1, generator=g), torch.randn(1, bb.dim, generator=g)
    return to_base64(encode_task(TaskFactors(name, "family", u, v, bb.fingerprint)))


def test_upload_list_get_content_delete(client: TestClient) -> None:
    meta = upload(client, GOOD).json()
    assert meta["object"] == "file" and meta["purpose"] == "fine-tune"
    assert meta["bytes"] == len(GOOD) and meta["rankone"] == {
        "format": "text",
        "examples": 2,
        "scope": None,
    }
    assert meta["id"] in [f["id"] for f in client.get("/v1/files", headers=ADMIN).json()["data"]]
    assert client.get(f"/v1/files/{meta['id']}", headers=ADMIN).json() == meta
    assert client.get(f"/v1/files/{meta['id']}/content", headers=ADMIN).content == GOOD
    gone = client.delete(f"/v1/files/{meta['id']}", headers=ADMIN).json()
    assert gone == {"id": meta["id"], "object": "file", "deleted": True}
    error_of(client.get(f"/v1/files/{meta['id']}", headers=ADMIN), 404, meta["id"])
    error_of(client.get("/v1/files/../../etc", headers=ADMIN), 404)


@pytest.mark.parametrize(
    ("content", "status", "needles"),
    [
        (b'{"input": "a", "target": "b"}\nnot json\n{"input": 1, "target": "x"}\n', 422,
         ["line 2: not valid JSON", 'line 3: "input" must be a string']),
        (b"", 422, ["no examples"]),
        (b"\xff\xfe", 422, ["UTF-8"]),
        (b'[1, 2]\n', 422, ["line 1: expected a JSON object"]),
        (b'{"input": "a", "target": " "}\n', 422, ['"target" is empty']),
        (jsonl([{"messages": [{"role": "user", "content": "hi"}]}]), 422, ["line 1: a chat example needs at least one message before"]),
        (jsonl([{"messages": [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "yo"}]}]), 422,
         ["chat template"]),
        (jsonl([{"input": "a", "target": "b"},
                {"messages": [{"role": "user", "content": "q"},
                              {"role": "bot", "content": "a"}]}]), 422,
         ["line 2: message 1: role must be one of"]),
        (b'{"input": "a", "target": "b"}\n' * 51, 413, ["more than 50 examples"]),
        (b" " * 5000, 413, ["limit is 4096"]),
    ],
)  # fmt: skip
def test_bad_files_are_refused_and_nothing_is_stored(
    client: TestClient, content: bytes, status: int, needles: list[str]
) -> None:
    before = client.get("/v1/files", headers=ADMIN).json()["data"]
    error_of(upload(client, content), status, *needles)
    assert client.get("/v1/files", headers=ADMIN).json()["data"] == before


def test_bad_purpose_and_client_key(client: TestClient) -> None:
    error_of(upload(client, GOOD, purpose="assistants"), 422, "fine-tune")
    r = client.post(
        "/v1/files",
        files={"file": ("t.jsonl", GOOD)},
        data={"purpose": "fine-tune"},
        headers=CLIENT,
    )
    assert r.status_code == 403
    assert client.get("/v1/fine_tuning/jobs", headers=CLIENT).status_code == 403
    assert client.get("/v1/fine_tuning/jobs").status_code == 401


@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"model": "nope"}, 422, "no shared prompt 'nope'"),
        ({"training_file": "file-000000000000000000000000"}, 422, "training_file: no file"),
        ({"validation_file": "x"}, 422, "validation_file: no file"),
        ({"suffix": "Bad Name"}, 422, "invalid suffix"),
        ({"suffix": "taken"}, 409, "task 'taken' exists"),
        ({"hyperparameters": {"n_epochs": 0}}, 422, "n_epochs must be 1-100"),
        ({"hyperparameters": {"batch_size": 1000}}, 422, "batch_size must be 1-256"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, 422, "learning_rate_multiplier"),
        ({"hyperparameters": {"steps": 501}}, 422, "exceed the server's limit of 500"),
        ({"hyperparameters": {"nonsense": 1}}, 422, "nonsense"),
        ({"rankone": {"mode": "multi-target"}}, 422, "rankone.mode"),
        ({"rankone": {"shots": 0}}, 422, "rankone.shots"),
        ({"rankone": {"instruction": ""}}, 422, "rankone.instruction"),
        (
            {"rankone": {"instruction": "a"}, "hyperparameters": {"instruction": "b"}},
            422,
            "instruction and rankone.instruction differ",
        ),
        ({"integrations": [{"type": "wandb"}]}, 422, "integrations"),
    ],
)
def test_bad_jobs_are_4xx(
    client: TestClient, change: dict[str, Any], status: int, needle: str
) -> None:
    file_id = upload(client, GOOD).json()["id"]
    body = {"model": "family", "training_file": file_id, "suffix": "new-task", **change}
    error_of(client.post("/v1/fine_tuning/jobs", json=body, headers=ADMIN), status, needle)


def test_a_job_runs_to_a_registered_task(client: TestClient, gpt2_backbone: Backbone) -> None:
    drain(client)
    job = new_job(client, "adapted", hyperparameters={"n_epochs": 3, "batch_size": 1}, seed=3)
    assert job["status"] == "queued" and job["fine_tuned_model"] is None
    assert job["hyperparameters"] == {
        "n_epochs": 3,
        "batch_size": 1,
        "learning_rate_multiplier": 1.0,
    }
    assert job["rankone"]["steps"] == 6 and "_lease_token" not in job
    got = claim(client)
    assert got["job"]["id"] == job["id"] and got["job"]["status"] == "running"
    assert got["shared_prompt"] and got["lease_token"]
    assert (
        client.post("/v1/fine_tuning/claims", json={"worker": "w2"}, headers=ADMIN).status_code
        == 204
    )
    token, jid = got["lease_token"], job["id"]
    assert (
        client.post(
            f"/v1/fine_tuning/jobs/{jid}/lease", json={"lease_token": token}, headers=ADMIN
        ).status_code
        == 200
    )
    progress = {"lease_token": token, "events": [{"step": 3, "total_steps": 6, "train_loss": 1.5}]}
    assert (
        client.post(
            f"/v1/fine_tuning/jobs/{jid}/progress", json=progress, headers=ADMIN
        ).status_code
        == 204
    )
    result = {
        "lease_token": token,
        "factors": factors_b64(gpt2_backbone, "x"),
        "metrics": {"trained_tokens": 12},
    }
    done = client.post(f"/v1/fine_tuning/jobs/{jid}/result", json=result, headers=ADMIN)
    assert done.status_code == 200, done.text
    assert done.json()["status"] == "succeeded" and done.json()["fine_tuned_model"] == "adapted"
    task = client.get("/v1/tasks/adapted", headers=ADMIN).json()
    assert task["version"] == 1 and task["metadata"]["fine_tuning_job"] == jid
    # a second result for the same job is refused: the job is over, its lease with it
    error_of(
        client.post(f"/v1/fine_tuning/jobs/{jid}/result", json=result, headers=ADMIN), 409, "lease"
    )
    assert client.get("/v1/tasks/adapted", headers=ADMIN).json()["version"] == 1
    events = client.get(f"/v1/fine_tuning/jobs/{jid}/events", headers=ADMIN).json()["data"]
    assert events[0]["message"].startswith("task 'adapted' version 1 registered")
    assert any(e["data"].get("train_loss") == 1.5 for e in events)
    assert client.get("/v1/models", headers=CLIENT).status_code == 200
    listed = client.get("/v1/fine_tuning/jobs?limit=1", headers=ADMIN).json()
    assert [j["id"] for j in listed["data"]] == [jid]
    error_of(
        client.post(f"/v1/fine_tuning/jobs/{jid}/cancel", headers=ADMIN), 409, "already succeeded"
    )


def test_expired_lease_is_reclaimed_then_fails_after_max_attempts(client: TestClient) -> None:
    drain(client)
    job = new_job(client, "flaky")
    first = claim(client, lease_s=0.2)
    time.sleep(0.4)
    second = claim(client, lease_s=0.2)  # the first worker "died": handed out again
    assert second["job"]["id"] == job["id"] and second["job"]["rankone"]["attempts"] == 2
    stale = {"lease_token": first["lease_token"]}
    error_of(
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/lease", json=stale, headers=ADMIN),
        409,
        "no longer valid",
    )
    time.sleep(0.4)
    assert (
        client.post("/v1/fine_tuning/claims", json={"worker": "w3"}, headers=ADMIN).status_code
        == 204
    )
    failed = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=ADMIN).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "lease_expired"
    assert "attempt 2 of 2" in failed["error"]["message"]


def test_registration_is_idempotent_by_job_id(
    client: TestClient, gpt2_backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    drain(client)
    job = new_job(client, "once")
    first = claim(client, lease_s=0.3)
    real = lifecycle.succeed

    def lost(*args: Any, **kwargs: Any) -> Any:  # the lease runs out right after registering
        raise lifecycle.LeaseLostError("lease lost")

    monkeypatch.setattr(lifecycle, "succeed", lost)
    result = {"lease_token": first["lease_token"], "factors": factors_b64(gpt2_backbone, "once")}
    error_of(
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/result", json=result, headers=ADMIN), 409
    )
    assert client.get("/v1/tasks/once", headers=ADMIN).json()["version"] == 1
    monkeypatch.setattr(lifecycle, "succeed", real)
    time.sleep(0.5)
    second = claim(client)
    result["lease_token"] = second["lease_token"]
    done = client.post(
        f"/v1/fine_tuning/jobs/{job['id']}/result", json=result, headers=ADMIN
    ).json()
    assert done["status"] == "succeeded" and done["rankone"]["task_version"] == 1
    assert client.get("/v1/tasks/once", headers=ADMIN).json()["version"] == 1


def test_replace_registers_a_new_version(client: TestClient, gpt2_backbone: Backbone) -> None:
    drain(client)
    job = new_job(client, "taken", rankone={"replace": True})
    got = claim(client)
    result = {"lease_token": got["lease_token"], "factors": factors_b64(gpt2_backbone, "taken")}
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/result", json=result, headers=ADMIN)
    assert client.get("/v1/tasks/taken", headers=ADMIN).json()["version"] == 2


def test_bad_result_fails_the_job_with_its_reason(client: TestClient) -> None:
    drain(client)
    job = new_job(client, "broken")
    got = claim(client)
    result = {"lease_token": got["lease_token"], "factors": "bm90IGEgYmxvYg=="}
    error_of(
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/result", json=result, headers=ADMIN), 422
    )
    failed = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=ADMIN).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "registration_failed"


def test_cancel_queued_and_running(client: TestClient) -> None:
    drain(client)
    queued = new_job(client, "c1")
    cancelled = client.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel", headers=ADMIN).json()
    assert cancelled["status"] == "cancelled"
    running = new_job(client, "c2")
    got = claim(client)
    assert got["job"]["id"] == running["id"]
    client.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel", headers=ADMIN)
    lease = {"lease_token": got["lease_token"]}
    error_of(
        client.post(f"/v1/fine_tuning/jobs/{running['id']}/lease", json=lease, headers=ADMIN),
        409,
        "cancelled",
    )
    error_of(client.get("/v1/fine_tuning/jobs/ftjob-nope", headers=ADMIN), 404, "ftjob-nope")


def test_file_in_use_and_wrong_backbone(client: TestClient) -> None:
    drain(client)
    job = new_job(client, "uses-file")
    error_of(client.delete(f"/v1/files/{job['training_file']}", headers=ADMIN), 409, job["id"])
    r = client.post(
        "/v1/fine_tuning/claims", json={"worker": "w", "backbone": "other"}, headers=ADMIN
    )
    error_of(r, 409, "start the worker with the server's model")


def test_files_jobs_and_events_survive_a_restart(client: TestClient) -> None:
    drain(client)
    job = new_job(client, "durable")
    running = claim(client)
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=ADMIN).json()
    settings = client.app.state.test_settings  # type: ignore[attr-defined]
    with TestClient(create_app(settings), raise_server_exceptions=False) as again:
        assert (
            again.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=ADMIN).json()["status"]
            == "running"
        )
        assert again.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=ADMIN).json() == events
        content = again.get(f"/v1/files/{job['training_file']}/content", headers=ADMIN)
        assert content.content == GOOD
        lease = {"lease_token": running["lease_token"]}  # the lease outlives the restart
        assert (
            again.post(
                f"/v1/fine_tuning/jobs/{job['id']}/lease", json=lease, headers=ADMIN
            ).status_code
            == 200
        )
        again.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=ADMIN)


def test_worker_posts_are_validated(client: TestClient) -> None:
    drain(client)
    job = new_job(client, "checked")
    got = claim(client)
    path = f"/v1/fine_tuning/jobs/{job['id']}"
    nan = {"lease_token": got["lease_token"], "events": [{"step": 1, "train_loss": math.nan}]}
    raw = {
        **ADMIN,
        "content-type": "application/json",
    }  # NaN is not JSON: send it as Python writes it
    r = client.post(f"{path}/progress", content=json.dumps(nan), headers=raw)
    error_of(r, 422, "train_loss")
    empty = {"lease_token": got["lease_token"], "events": []}
    error_of(client.post(f"{path}/progress", json=empty, headers=ADMIN), 422, "events")
    inf = {"lease_token": got["lease_token"], "factors": "eA==", "metrics": {"loss": math.inf}}
    r = client.post(f"{path}/result", content=json.dumps(inf), headers=raw)
    error_of(r, 422, "metrics.loss")
    failure = {"lease_token": got["lease_token"], "message": "out of memory"}
    failed = client.post(f"{path}/failure", json=failure, headers=ADMIN).json()
    assert failed["status"] == "failed" and failed["error"]["message"] == "out of memory"
    events = client.get(f"{path}/events?limit=2", headers=ADMIN).json()
    older = client.get(f"{path}/events?after={events['data'][-1]['id']}", headers=ADMIN).json()
    assert (
        events["has_more"] and older["data"] and older["data"][0]["id"] != events["data"][0]["id"]
    )


def test_a_job_past_its_time_limit_fails_even_if_renewed(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    drain(client)
    handler = client.app.state.fine_tuning  # type: ignore[attr-defined]
    monkeypatch.setattr(
        handler, "settings", handler.settings.model_copy(update={"finetune_job_timeout_s": 0.3})
    )
    job = new_job(client, "slow")
    got = claim(client, lease_s=0.2)
    lease = {"lease_token": got["lease_token"]}
    for _ in range(6):  # renewing does not extend the lease past the time limit
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/lease", json=lease, headers=ADMIN)
        time.sleep(0.15)
    client.post("/v1/fine_tuning/claims", json={"worker": "w"}, headers=ADMIN)  # runs the reaper
    failed = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=ADMIN).json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "time_limit"


def test_scoped_admin_keys(client: TestClient) -> None:
    drain(client)
    team = {"Authorization": "Bearer team-key"}
    mine = client.post(
        "/v1/files", files={"file": ("t.jsonl", GOOD)}, data={"purpose": "fine-tune"}, headers=team
    ).json()
    assert mine["rankone"]["scope"] == ["team-*"]
    theirs = upload(client, GOOD).json()  # an unscoped key's file: invisible to the team key
    error_of(client.get(f"/v1/files/{theirs['id']}", headers=team), 404)
    assert [f["id"] for f in client.get("/v1/files", headers=team).json()["data"]] == [mine["id"]]
    body = {"model": "family", "training_file": mine["id"], "suffix": "other-task"}
    error_of(client.post("/v1/fine_tuning/jobs", json=body, headers=team), 403, "team-*")
    job = client.post(
        "/v1/fine_tuning/jobs", json={**body, "suffix": "team-task"}, headers=team
    ).json()
    assert job["status"] == "queued"
    error_of(
        client.post(
            "/v1/fine_tuning/jobs",
            json={**body, "suffix": "team-x", "training_file": theirs["id"]},
            headers=team,
        ),
        422,
        "no file",
    )
    listed = client.get("/v1/fine_tuning/jobs", headers=team).json()["data"]
    assert {j["rankone"]["task"] for j in listed} == {"team-task"}
    other = new_job(client, "not-team")
    error_of(client.get(f"/v1/fine_tuning/jobs/{other['id']}", headers=team), 403)
    error_of(
        client.post("/v1/fine_tuning/claims", json={"worker": "w"}, headers=team), 403, "unscoped"
    )
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=ADMIN).status_code == 200


# -- exactly once under races ---------------------------------------------------------------

ROUNDS = 20


def test_cancel_racing_the_result_registers_once_or_not_at_all(
    client: TestClient, gpt2_backbone: Backbone
) -> None:
    """cancel ‖ result, 20 times: a succeeded job has exactly one task version made by it and
    its cancel got 409; a cancelled job registered nothing and its result got 409. Never both,
    never neither, never a job left running."""
    from concurrent.futures import ThreadPoolExecutor

    drain(client)
    outcomes: dict[str, int] = {"succeeded": 0, "cancelled": 0}
    with ThreadPoolExecutor(2) as pool:
        for i in range(ROUNDS):
            name = f"race-{i}"
            job = new_job(client, name)
            lease = claim(client)
            assert lease["job"]["id"] == job["id"]
            result = {
                "lease_token": lease["lease_token"],
                "factors": factors_b64(gpt2_backbone, name),
            }
            url = f"/v1/fine_tuning/jobs/{job['id']}"
            posted = pool.submit(client.post, f"{url}/result", json=result, headers=ADMIN)
            cancelled = pool.submit(client.post, f"{url}/cancel", headers=ADMIN)
            r, c = posted.result(), cancelled.result()
            status = client.get(url, headers=ADMIN).json()["status"]
            task = client.get(f"/v1/tasks/{name}", headers=ADMIN)
            assert status in outcomes, (status, r.text, c.text)
            outcomes[status] += 1
            if status == "succeeded":
                assert (r.status_code, c.status_code) == (200, 409), (r.text, c.text)
                assert task.json()["version"] == 1
                assert task.json()["metadata"]["fine_tuning_job"] == job["id"]
            else:
                assert (r.status_code, c.status_code) == (409, 200), (r.text, c.text)
                assert task.status_code == 404, task.text
    assert sum(outcomes.values()) == ROUNDS


def test_a_suffix_is_reserved_at_creation(client: TestClient) -> None:
    drain(client)
    first = new_job(client, "reserved")
    file_id = upload(client, GOOD).json()["id"]
    body = {"model": "family", "training_file": file_id, "suffix": "reserved"}
    message = error_of(client.post("/v1/fine_tuning/jobs", json=body, headers=ADMIN), 409)
    assert first["id"] in message and "another suffix" in message
    replace = {**body, "rankone": {"replace": True}}  # replacing does not share a name either
    error_of(client.post("/v1/fine_tuning/jobs", json=replace, headers=ADMIN), 409, first["id"])
    client.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel", headers=ADMIN)
    again = client.post("/v1/fine_tuning/jobs", json=body, headers=ADMIN)  # free once it ended
    assert again.status_code == 200, again.text
    client.post(f"/v1/fine_tuning/jobs/{again.json()['id']}/cancel", headers=ADMIN)


def test_two_creates_racing_for_one_suffix_get_one_job(client: TestClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    drain(client)
    file_id = upload(client, GOOD).json()["id"]
    body = {"model": "family", "training_file": file_id, "suffix": "contested"}
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda _: client.post("/v1/fine_tuning/jobs", json=body, headers=ADMIN), range(4)
            )
        )
    assert sorted(r.status_code for r in answers) == [200, 409, 409, 409], [r.text for r in answers]
    drain(client)


def test_scoped_job_answers_name_nothing_foreign(client: TestClient) -> None:
    """A team key learns nothing of other teams' tasks or jobs: creating a job for an existing
    foreign task and for an absent one are the same 403; a foreign job id and an unknown one
    are the same 403, naming no task."""
    drain(client)
    team = {"Authorization": "Bearer team-key"}
    mine = client.post(
        "/v1/files", files={"file": ("t.jsonl", GOOD)}, data={"purpose": "fine-tune"}, headers=team
    ).json()
    body = {"model": "family", "training_file": mine["id"]}
    exists = client.post("/v1/fine_tuning/jobs", json={**body, "suffix": "taken"}, headers=team)
    absent = client.post("/v1/fine_tuning/jobs", json={**body, "suffix": "nope-x"}, headers=team)
    assert exists.status_code == absent.status_code == 403
    assert exists.json()["error"]["message"].replace("'taken'", "X") == absent.json()["error"][
        "message"
    ].replace("'nope-x'", "X")
    replace = {**body, "suffix": "taken", "rankone": {"replace": True}}
    error_of(client.post("/v1/fine_tuning/jobs", json=replace, headers=team), 403)
    foreign = new_job(client, "secret-task")
    unknown = "ftjob-" + "0" * 24
    answers = {
        job_id: [
            client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=team),
            client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=team),
            client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=team),
        ]
        for job_id in (foreign["id"], unknown)
    }
    for job_id, responses in answers.items():
        for r in responses:
            message = error_of(r, 403, job_id)
            assert "secret-task" not in message
            other = unknown if job_id == foreign["id"] else foreign["id"]
            assert message.replace(job_id, "X") in {
                m.json()["error"]["message"].replace(other, "X") for m in answers[other]
            }
    assert client.get(f"/v1/fine_tuning/jobs/{unknown}", headers=ADMIN).status_code == 404
    drain(client)


def test_the_reaper_restarts_a_missing_worker(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embedded mode's rule, on the handler: while a job is queued the reaper asks for a
    worker every round, not only when a job is created."""
    import asyncio

    from service.handlers import fine_tuning as jobs_handler

    drain(client)
    handler = client.app.state.fine_tuning  # type: ignore[attr-defined]
    calls: list[float] = []

    async def on_queued() -> None:
        calls.append(time.monotonic())

    monkeypatch.setattr(jobs_handler, "REAP_EVERY_S", 0.05)
    monkeypatch.setattr(handler, "on_queued", on_queued)

    async def rounds() -> None:
        reaper = asyncio.ensure_future(handler._reap_forever())
        await asyncio.sleep(0.4)
        reaper.cancel()

    client.portal.call(rounds)  # type: ignore[attr-defined]
    assert not calls  # nothing queued: no worker wanted
    job = new_job(client, "lonely")
    client.portal.call(rounds)  # type: ignore[attr-defined]
    assert len(calls) >= 3
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=ADMIN)


def test_a_bad_document_written_behind_the_api_never_breaks_a_listing(client: TestClient) -> None:
    """A job and an event holding a lone surrogate (stored before the client-text rule, or by a
    tool behind the API) read back with U+FFFD: the listings answer 200."""
    import copy

    drain(client)
    job = new_job(client, "legacy-job")
    backend = client.app.state.fine_tuning.jobs  # type: ignore[attr-defined]

    def poison(doc: dict[str, Any], now: float) -> tuple[dict[str, Any], list[Any]]:
        doc = copy.deepcopy(doc)
        doc["metadata"] = {"note": "a\ud800b"}
        return doc, [lifecycle.event(now, "odd \udfff")]

    client.portal.call(backend.update_job, job["id"], poison)  # type: ignore[attr-defined]
    listed = client.get("/v1/fine_tuning/jobs?limit=1000", headers=ADMIN)
    assert listed.status_code == 200, listed.text
    mine = next(j for j in listed.json()["data"] if j["id"] == job["id"])
    assert mine["metadata"] == {"note": "a\ufffdb"}
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=ADMIN)
    assert events.status_code == 200 and events.json()["data"][0]["message"] == "odd \ufffd"
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=ADMIN)


def test_shots_below_the_upload_is_said_and_the_last_event_has_the_valid_figures(
    client: TestClient, gpt2_backbone: Backbone
) -> None:
    drain(client)
    job = new_job(client, "few-shots", rankone={"shots": 1})  # GOOD holds 2 examples
    assert job["rankone"]["examples"] == {"uploaded": 2, "used": 1}
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=ADMIN).json()["data"]
    said = [e for e in events if "1 of the 2 uploaded examples" in e["message"]]
    assert said and said[0]["level"] == "warn" and "shots=1" in said[0]["message"]
    everything = new_job(client, "all-shots")
    assert everything["rankone"]["examples"] == {"uploaded": 2, "used": 2}

    got = claim(client)
    assert got["job"]["id"] == job["id"]
    metrics = {"steps": 6, "final_val_loss": 0.5, "valid_accuracy": 0.75, "trained_tokens": 12}
    result = {
        "lease_token": got["lease_token"],
        "factors": factors_b64(gpt2_backbone, "x"),
        "metrics": metrics,
    }
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/result", json=result, headers=ADMIN)
    assert r.status_code == 200, r.text
    last = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=ADMIN).json()["data"][0]
    assert last["data"] == {"step": 6, "valid_loss": 0.5, "valid_accuracy": 0.75}
    assert last["type"] == "metrics" and "valid accuracy 0.75" in last["message"]
    drain(client)


def test_a_result_with_its_own_shared_prompt_registers_both(
    client: TestClient, gpt2_backbone: Backbone
) -> None:
    """Paper mode / prompt tuning: the task composes with a shared prompt the job made; it is
    registered first (once per job id), and a clash with someone else's id fails the job."""
    drain(client)
    fp = gpt2_backbone.fingerprint
    own = SharedPrompt("own-p", torch.ones(PROMPT_LENGTH, gpt2_backbone.dim), fp)
    ones = TaskFactors(
        "own", "own-p", torch.ones(PROMPT_LENGTH, 1), torch.ones(1, gpt2_backbone.dim), fp
    )
    job = new_job(client, "own")
    got = claim(client)
    result = {
        "lease_token": got["lease_token"],
        "factors": to_base64(encode_task(ones)),
        "shared_prompt": to_base64(encode_shared(own)),
    }
    done = client.post(f"/v1/fine_tuning/jobs/{job['id']}/result", json=result, headers=ADMIN)
    assert done.status_code == 200, done.text
    assert client.get("/v1/tasks/own", headers=ADMIN).json()["shared"] == "own-p"
    shared = client.get("/v1/shared-prompts/own-p", headers=ADMIN).json()
    assert shared["metadata"]["fine_tuning_job"] == job["id"]
    # another job whose own shared prompt has the same id (and no rankone.replace) fails
    job2 = new_job(client, "own2")
    got = claim(client)
    clash = {**result, "lease_token": got["lease_token"]}
    clash["factors"] = to_base64(encode_task(TaskFactors("own2", "own-p", ones.u, ones.v, fp)))
    error_of(
        client.post(f"/v1/fine_tuning/jobs/{job2['id']}/result", json=clash, headers=ADMIN), 409
    )
    failed = client.get(f"/v1/fine_tuning/jobs/{job2['id']}", headers=ADMIN).json()
    assert failed["status"] == "failed" and "own-p" in failed["error"]["message"]
    assert client.get("/v1/tasks/own2", headers=ADMIN).status_code == 404
