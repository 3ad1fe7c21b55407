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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prompts import Backbone, load_backbone
from tests.gguf_files import build_tiny_tied_llama
from tests.service.conftest import (
    ADMIN,
    CLIENT,
    app_client,
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
    with app_client(
        path,
        bb,
        tmp_path_factory.mktemp("hostile-data"),
        {"alpha": {"seed": 0}},
        max_new_tokens_limit=8,
        default_max_new_tokens=4,
        queue_size=QUEUE,
        finetune_worker="off",
    ) as c:
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


# -- arbitrary Unicode through every text field of every route (property-based) ------------

ODD = ["\ud800", "\udfff", "a\udc00\ud800", "\u2028", "\u2029", "\x00", "\U0001f600", "\ufeff"]
TEXT = st.one_of(
    st.sampled_from(ODD),
    st.text(st.characters(exclude_categories=()), max_size=10),  # surrogates included
    st.lists(st.sampled_from([*ODD, "ab", "z", " "]), min_size=1, max_size=5).map("".join),
)
JOB = "ftjob-" + "0" * 24


def _bodies(text: str, file_id: str, bb: Backbone) -> list[tuple[str, str, Any, dict[str, str]]]:
    """(method, url, JSON body, headers) for every route with a text field, ``text`` in it."""
    task = task_body(bb, "alpha", seed=0)
    uv = {"u": task["u"], "v": task["v"]}
    part = [{"type": "text", "text": text}]
    return [
        ("POST", "/v1/tasks/alpha/generate", {"inputs": text}, CLIENT),
        ("POST", "/v1/tasks/alpha/generate", {"inputs": [text, "x"], "parameters": {"stop": [text]}}, CLIENT),
        ("POST", "/v1/tasks/alpha/generate", {"inputs": text, "stream": True}, CLIENT),
        ("POST", "/v1/completions", {"model": text, "prompt": "x", "max_tokens": 1}, CLIENT),
        ("POST", "/v1/completions", {"model": "alpha", "prompt": [text], "stop": text, "max_tokens": 1}, CLIENT),
        ("POST", "/v1/completions", {"model": "alpha", "prompt": text, "stream": True, "max_tokens": 1}, CLIENT),
        ("POST", "/v1/chat/completions", {**chat(text, max_tokens=1), "user": text}, CLIENT),
        ("POST", "/v1/chat/completions", {**chat(part, max_tokens=1, stream=True), "stop": [text]}, CLIENT),
        ("POST", "/v1/chat/completions", {"model": text, "messages": [{"role": "user", "content": "x", "name": text}]}, CLIENT),
        ("POST", "/v1/tasks", {"name": text, "shared": "family", **uv}, ADMIN),
        ("POST", "/v1/tasks", {"name": "t-prop", "shared": text, **uv}, ADMIN),
        ("PUT", "/v1/tasks/alpha", {"shared": "family", **uv, "description": text, "metadata": {text: [text]}, "parameters": {"stop": text}}, ADMIN),
        ("POST", "/v1/shared-prompts", {"id": text, "prompt": [[0.0] * bb.dim], "description": text}, ADMIN),
        ("POST", "/v1/fine_tuning/jobs", {"model": "family", "training_file": file_id, "suffix": text}, ADMIN),
        ("POST", "/v1/fine_tuning/jobs", {"model": text, "training_file": text, "validation_file": text, "metadata": {"k": text}}, ADMIN),
        ("POST", "/v1/fine_tuning/claims", {"worker": text, "backbone": text}, ADMIN),
        ("POST", f"/v1/fine_tuning/jobs/{JOB}/progress", {"lease_token": text, "events": [{"step": 1, "message": text}]}, ADMIN),
        ("POST", f"/v1/fine_tuning/jobs/{JOB}/failure", {"lease_token": text, "code": text, "message": text}, ADMIN),
        ("POST", f"/v1/fine_tuning/jobs/{JOB}/result", {"lease_token": "t", "factors": text, "metrics": {text: text}}, ADMIN),
    ]  # fmt: skip


def _gets(text: str) -> list[str]:
    """URLs with ``text`` in a path segment or a query value (percent-encoded, as a client
    must send it)."""
    from urllib.parse import quote

    q = quote(text.encode("utf-8", "surrogatepass"), safe="")
    return [
        f"/v1/tasks/{q}",
        f"/v1/shared-prompts/{q}",
        f"/v1/files/{q}",
        f"/v1/files?purpose={q}",
        f"/v1/fine_tuning/jobs/{q}",
        f"/v1/fine_tuning/jobs?after={q}",
        f"/v1/fine_tuning/jobs/{JOB}/events?after={q}",
    ]


def _readable(c: TestClient) -> None:
    """Every listing answers 200 with JSON that parses."""
    for url, headers in [
        ("/v1/tasks?limit=1000", ADMIN),
        ("/v1/shared-prompts", ADMIN),
        ("/v1/models", CLIENT),
        ("/v1/files", ADMIN),
        ("/v1/fine_tuning/jobs?limit=1000", ADMIN),
    ]:
        r = c.get(url, headers=headers)
        assert r.status_code == 200, (url, r.text)
        json.loads(r.content.decode("utf-8"))
    for task in c.get("/v1/tasks?limit=1000", headers=ADMIN).json()["tasks"]:
        assert c.get(f"/v1/tasks/{task['name']}", headers=ADMIN).status_code == 200


@settings(
    max_examples=40,
    derandomize=True,  # the same texts on every run
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(text=TEXT, raw=st.binary(max_size=12))
def test_arbitrary_text_through_every_route_never_5xx(
    client: TestClient, llama: tuple[Path, Backbone], text: str, raw: bytes
) -> None:
    """Every text field of every route, and path and query text, with arbitrary Unicode (lone
    surrogates, U+2028, NUL, astral characters): never a 5xx, and every listing stays readable."""
    file_id = _upload(client, text, raw)
    for method, url, body, headers in _bodies(text, file_id, llama[1]):
        r = client.request(
            method,
            url,
            content=json.dumps(body),  # lone surrogates go as \\udXXX escapes, as JSON allows
            headers={**headers, "Content-Type": "application/json"},
        )
        assert r.status_code < 500, (method, url, body, r.text)
        if r.status_code == 422:
            json.loads(r.content.decode("utf-8"))  # the error itself is valid UTF-8 JSON
    for url in _gets(text):
        r = client.get(url, headers=ADMIN)
        assert r.status_code < 500, (url, r.text)
    for job in client.get("/v1/fine_tuning/jobs?limit=1000", headers=ADMIN).json()["data"]:
        if job["status"] == "queued":  # keep the queue short (no worker runs here)
            client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=ADMIN)
    _readable(client)


def _upload(c: TestClient, text: str, raw: bytes) -> str:
    """Upload files whose name, purpose and lines carry ``text`` (and raw bytes); return the id
    of a good one for job bodies."""
    row = json.dumps({"input": text, "target": text + "t"}).encode()
    for name, purpose, content in [
        (text, "fine-tune", row + b"\n"),
        ("f.jsonl", text, row),
        ("f.jsonl", "fine-tune", raw + b"\n" + row),
        (
            "f.jsonl",
            "fine-tune",
            json.dumps({"messages": [{"role": "user", "content": text}]}).encode(),
        ),
    ]:
        r = c.post(
            "/v1/files",
            files={
                "file": (name.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), content)
            },
            data={"purpose": purpose.encode("utf-8", "surrogatepass").decode("latin-1")},
            headers=ADMIN,
        )
        assert r.status_code < 500, (name, purpose, content, r.text)
    good = c.post(
        "/v1/files",
        files={"file": ("good.jsonl", b'{"input": "a", "target": "b"}\n')},
        data={"purpose": "fine-tune"},
        headers=ADMIN,
    )
    assert good.status_code == 200, good.text
    return str(good.json()["id"])
