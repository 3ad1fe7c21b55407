"""What an adversarial client sends, through the routes (TestClient + lifespan, a tiny chat
Llama): lone surrogates and other odd text, loosely typed bodies, a tiny top_p, a request
larger than the queue, a wrong method. Each answers 4xx or succeeds, never 5xx, and the
registry stays readable."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from prompts import Backbone, load_backbone
from service.app import create_app
from service.settings import Settings
from tests.gguf_files import build_tiny_tied_llama
from tests.service.conftest import (
    ADMIN,
    ADMIN_KEY,
    CLIENT,
    CLIENT_KEY,
    shared_body,
    shared_prompt,
    task_body,
)

QUEUE = 8
LONE = "a\ud800b"  # valid JSON ("a\\ud800b"), but no tokenizer or UTF-8 encoder takes it


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Backbone]:
    path = build_tiny_tied_llama(tmp_path_factory.mktemp("hostile") / "llama", seed=3)
    return path, load_backbone(path)


@pytest.fixture(scope="module")
def client(
    llama: tuple[Path, Backbone], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    path, bb = llama
    settings = Settings(
        model=str(path),
        data_dir=str(tmp_path_factory.mktemp("hostile-data")),
        admin_keys=[ADMIN_KEY],
        client_keys=[CLIENT_KEY],
        max_new_tokens_limit=8,
        default_max_new_tokens=4,
        queue_size=QUEUE,
        finetune_worker="off",
        log_level="WARNING",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert c.post("/v1/shared-prompts", json=shared_body(shared_prompt(bb)), headers=ADMIN)
        assert c.post("/v1/tasks", json=task_body(bb, "alpha", seed=0), headers=ADMIN)
        yield c


def post(c: TestClient, url: str, body: dict[str, Any], headers: dict[str, str] = CLIENT) -> Any:
    """The body as JSON text with lone surrogates kept as escapes (httpx would refuse them)."""
    raw = json.dumps(body)  # ensure_ascii: "\ud800" stays a \\ud800 escape
    return c.post(url, content=raw, headers={**headers, "Content-Type": "application/json"})


def refused(response: Any, status: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    message: str = response.json()["error"]["message"]
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def chat(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "alpha", "messages": [{"role": "user", "content": content}], **extra}


# -- one rule for client text ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/v1/chat/completions", chat(LONE), "messages.0.content"),
        (
            "/v1/chat/completions",
            chat([{"type": "text", "text": LONE}]),
            "messages.0.content.0.text",
        ),
        ("/v1/chat/completions", chat(LONE, stream=True), "messages.0.content"),
        ("/v1/tasks/alpha/generate", {"inputs": LONE}, "inputs"),
        ("/v1/tasks/alpha/generate", {"inputs": ["ok", LONE]}, "inputs.1"),
        ("/v1/tasks/alpha/generate", {"inputs": LONE, "stream": True}, "inputs"),
        ("/v1/completions", {"model": "alpha", "prompt": LONE}, "prompt"),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "stop": [LONE]}, "stop.0"),
    ],
)
def test_a_lone_surrogate_is_a_422_naming_the_field(
    client: TestClient, url: str, body: dict[str, Any], field: str
) -> None:
    refused(post(client, url, body), 422, f"{field}: text must be valid Unicode", "surrogate")


def test_a_lone_surrogate_is_never_stored(client: TestClient, llama: tuple[Path, Backbone]) -> None:
    bb = llama[1]
    bad = task_body(bb, "stopper", seed=1, parameters={"stop": [LONE]})
    refused(post(client, "/v1/tasks", bad, ADMIN), 422, "parameters.stop.0: text must be valid")
    meta = task_body(bb, "keyed", seed=1, metadata={LONE: 1})
    refused(post(client, "/v1/tasks", meta, ADMIN), 422, "metadata.a\\ud800b: text must be valid")
    assert client.get("/v1/tasks/stopper", headers=ADMIN).status_code == 404
    assert client.get("/v1/tasks", headers=ADMIN).status_code == 200


def test_a_bad_record_written_behind_the_api_never_breaks_reads(
    client: TestClient, llama: tuple[Path, Backbone]
) -> None:
    """A record stored before the rule (or by a tool behind the API): listed, read and served,
    its lone surrogate shown as U+FFFD."""
    from prompts import TaskFactors
    from tests.service.conftest import factors

    u, v = factors(llama[1], seed=2)
    tf = TaskFactors("legacy", "family", u, v, llama[1].fingerprint)
    meta = {"description": LONE, "metadata": {"k": LONE}, "parameters": {"stop": [LONE]}}
    client.portal.call(client.app.state.store.create_task, tf, meta)  # type: ignore[attr-defined]
    try:
        listing = client.get("/v1/tasks?limit=100", headers=ADMIN)
        assert listing.status_code == 200, listing.text
        shown = {t["name"]: t for t in listing.json()["tasks"]}["legacy"]
        assert shown["description"] == "a\ufffdb" and shown["parameters"]["stop"] == ["a\ufffdb"]
        assert client.get("/v1/tasks/legacy", headers=ADMIN).status_code == 200
        r = client.post("/v1/tasks/legacy/generate", json={"inputs": "hi"}, headers=CLIENT)
        assert r.status_code == 200, r.text
    finally:
        assert client.delete("/v1/tasks/legacy", headers=ADMIN).status_code == 204


@pytest.mark.parametrize(
    "text", ["nul\x00inside", "line\u2028separator\u2029", "astral \U0001f600 \U00010348", ""]
)
def test_other_odd_text_is_served(client: TestClient, text: str) -> None:
    for url, body in [
        ("/v1/tasks/alpha/generate", {"inputs": text or " "}),
        ("/v1/completions", {"model": "alpha", "prompt": text or " ", "max_tokens": 2}),
        ("/v1/chat/completions", chat(text, max_tokens=2)),
    ]:
        r = post(client, url, body)
        assert r.status_code == 200, (url, r.text)


# -- strict types on every body -------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"stream": 0}, "stream"),
        ({"stream": "true"}, "stream"),
        ({"temperature": "0.5"}, "temperature"),
        ({"seed": True}, "seed"),
        ({"n": 1.0}, "n"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ],
)
def test_chat_bodies_are_strictly_typed(
    client: TestClient, extra: dict[str, Any], field: str
) -> None:
    refused(post(client, "/v1/chat/completions", chat("hi", **extra)), 422, field)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": "4"}}, "hyperparameters.batch_size"),
        ({"seed": "1"}, "seed"),
        ({"rankone": {"replace": 1}}, "rankone.replace"),
        ({"rankone": {"shots": 2.0}}, "rankone.shots"),
    ],
)
def test_fine_tuning_bodies_are_strictly_typed(
    client: TestClient, extra: dict[str, Any], field: str
) -> None:
    body = {"model": "family", "training_file": "file-" + "0" * 24, **extra}
    refused(client.post("/v1/fine_tuning/jobs", json=body, headers=ADMIN), 422, field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"worker": "w", "lease_s": "5"}, "lease_s"),
        ({"worker": 7}, "worker"),
    ],
)
def test_worker_bodies_are_strictly_typed(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    refused(client.post("/v1/fine_tuning/claims", json=body, headers=ADMIN), 422, field)


# -- the engine's float math ----------------------------------------------------------------


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-46])
def test_any_positive_top_p_keeps_the_most_likely_token(client: TestClient, top_p: float) -> None:
    body = {"inputs": "hi", "parameters": {"temperature": 1.0, "top_p": top_p, "seed": 1}}
    r = client.post("/v1/tasks/alpha/generate", json=body, headers=CLIENT)
    assert r.status_code == 200, r.text
    greedy = {"inputs": "hi", "parameters": {"temperature": 0}}
    expected = client.post("/v1/tasks/alpha/generate", json=greedy, headers=CLIENT).json()
    assert r.json()["texts"] == expected["texts"]  # only the top token is left: greedy


# -- a request larger than the queue --------------------------------------------------------


def test_a_request_larger_than_the_queue_is_a_422_saying_why(client: TestClient) -> None:
    inputs = [f"x{i}" for i in range(QUEUE + 1)]
    r = client.post("/v1/tasks/alpha/generate", json={"inputs": inputs}, headers=CLIENT)
    refused(r, 422, f"{QUEUE + 1} inputs", f"holds {QUEUE}", "RANKONE_QUEUE_SIZE")
    assert "retry-after" not in r.headers
    r = post(client, "/v1/completions", {"model": "alpha", "prompt": inputs, "max_tokens": 1})
    refused(r, 422, "RANKONE_QUEUE_SIZE")
    refused(post(client, "/v1/chat/completions", chat("hi", n=QUEUE + 1)), 422, "choices")
    fits = client.post("/v1/tasks/alpha/generate", json={"inputs": inputs[:QUEUE]}, headers=CLIENT)
    assert fits.status_code == 200, fits.text


# -- 405 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url", "allow"),
    [
        ("PATCH", "/v1/tasks", {"GET", "POST"}),
        ("PATCH", "/v1/tasks/alpha", {"GET", "PUT", "DELETE"}),
        ("DELETE", "/v1/shared-prompts", {"GET", "POST"}),
        ("PUT", "/v1/files", {"GET", "POST"}),
        ("POST", "/v1/files/file-x", {"GET", "DELETE"}),
    ],
)
def test_405_lists_every_method_of_the_path(
    client: TestClient, method: str, url: str, allow: set[str]
) -> None:
    r = client.request(method, url, headers=ADMIN)
    assert r.status_code == 405, r.text
    assert set(r.headers["allow"].split(", ")) >= allow, r.headers["allow"]
    assert method not in r.headers["allow"]
