"""``POST /v1/chat/completions`` on a tiny chat Llama: the reference check, choices, streaming,
the 4xx answers (TestClient with the lifespan), and the official ``openai`` client against a
real server that serves the model from a GGUF file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from prompts import Backbone, load_backbone
from service.app import create_app
from service.settings import Settings
from tests.chat_reference import chat_reference_text
from tests.gguf_files import build_tiny_tied_llama, write_tiny_llama_gguf
from tests.service.conftest import (
    ADMIN,
    ADMIN_KEY,
    CLIENT,
    CLIENT_KEY,
    factors,
    server_env,
    shared_body,
    shared_prompt,
    task_body,
)
from tests.service.test_api_errors import expect

TASKS = ["alpha", "beta"]
CHAT = [
    {"role": "system", "content": "you are terse"},
    {"role": "user", "content": "the quick brown fox"},
]


@pytest.fixture(scope="module")
def chat_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tied_llama(tmp_path_factory.mktemp("chat-llama") / "llama", seed=3)


@pytest.fixture(scope="module")
def chat_llama(chat_llama_dir: Path) -> Backbone:
    return load_backbone(chat_llama_dir)


def _register(c: Any, bb: Backbone) -> None:
    assert (
        c.post("/v1/shared-prompts", json=shared_body(shared_prompt(bb)), headers=ADMIN).status_code
        == 201
    )
    for seed, name in enumerate(TASKS):
        r = c.post("/v1/tasks", json=task_body(bb, name, seed=seed), headers=ADMIN)
        assert r.status_code == 201, r.text


def _settings(model: Path, data: Path) -> Settings:
    return Settings(
        model=str(model),
        data_dir=str(data),
        admin_keys=[ADMIN_KEY],
        client_keys=[CLIENT_KEY],
        max_input_tokens=160,
        max_new_tokens_limit=24,
        log_level="WARNING",
    )


@pytest.fixture(scope="module")
def client(
    chat_llama_dir: Path, chat_llama: Backbone, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    app = create_app(_settings(chat_llama_dir, tmp_path_factory.mktemp("chat-data")))
    with TestClient(app, raise_server_exceptions=False) as c:
        _register(c, chat_llama)
        yield c


def _expected(bb: Backbone, task: str, messages: list[dict[str, Any]], n: int) -> str | None:
    u, v = factors(bb, seed=TASKS.index(task))
    return chat_reference_text(bb, shared_prompt(bb).prompt, u, v, messages, n)


def _chat(c: TestClient, **body: Any) -> Any:
    return c.post(
        "/v1/chat/completions", json={"model": "alpha", "messages": CHAT, **body}, headers=CLIENT
    )


def test_greedy_chat_equals_generate_on_the_rendered_conversation(
    client: TestClient, chat_llama: Backbone
) -> None:
    conversations = [
        CHAT,
        [{"role": "user", "content": "question: what is two plus two?"}],
        [*CHAT, {"role": "assistant", "content": "jumps"}, {"role": "user", "content": "more"}],
    ]
    checked = 0
    for task in TASKS:
        for messages in conversations:
            r = client.post(
                "/v1/chat/completions",
                json={"model": task, "messages": messages, "max_tokens": 12, "temperature": 0},
                headers=CLIENT,
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
            (choice,) = body["choices"]
            assert choice["message"]["role"] == "assistant"
            assert choice["finish_reason"] in {"stop", "length"}
            expected = _expected(chat_llama, task, messages, 12)
            if expected is not None:
                assert choice["message"]["content"] == expected
                checked += 1
            usage = body["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert checked >= 4


def test_max_completion_tokens_and_length_finish(client: TestClient) -> None:
    r = _chat(client, max_completion_tokens=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] <= 3
    if body["usage"]["completion_tokens"] == 3:
        assert body["choices"][0]["finish_reason"] == "length"


def test_n_choices_with_a_seed_are_reproducible_and_usage_counts_the_prompt_once(
    client: TestClient,
) -> None:
    body = {"n": 3, "temperature": 1.5, "seed": 7, "max_tokens": 8}
    first, again = _chat(client, **body).json(), _chat(client, **body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    single = _chat(client, max_tokens=8).json()
    assert first["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]


def _sse(response: Any) -> list[Any]:
    events = [
        line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_stream_chunks(client: TestClient) -> None:
    whole = _chat(client, max_tokens=10).json()
    r = _chat(client, max_tokens=10, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _sse(r)
    assert all(
        c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == whole["choices"][0]["finish_reason"] and not any(finish[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_stream_events_match_the_document(client: TestClient) -> None:
    """Every chunk of a chat stream (role, content, finish, usage, [DONE]) is read against the
    OpenAPI document's description of the events (the contract test's check)."""
    import schemathesis
    from schemathesis.checks import response_schema_conformance
    from schemathesis.core.transport import Response

    api = schemathesis.openapi.from_dict(client.app.openapi())
    body = {"model": "alpha", "messages": CHAT, "max_tokens": 6, "n": 2, "stream": True}
    body["stream_options"] = {"include_usage": True}
    case = api["/v1/chat/completions"]["POST"].Case(
        body=body, headers=CLIENT, media_type="application/json"
    )
    r = client.post("/v1/chat/completions", json=body, headers=CLIENT)
    assert r.status_code == 200 and r.text.count("data:") >= 5
    case.validate_response(Response.from_any(r), checks=[response_schema_conformance])
    broken = r.text.replace('"chat.completion.chunk"', '"chat.completion"', 1)
    bad = httpx.Response(200, headers=r.headers, content=broken.encode(), request=r.request)
    bad.elapsed = r.elapsed
    with pytest.raises(BaseException, match=r"(?i)schema"):
        case.validate_response(Response.from_any(bad), checks=[response_schema_conformance])


def test_stream_of_several_choices(client: TestClient) -> None:
    r = _chat(client, max_tokens=6, n=2, stream=True)
    chunks = _sse(r)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["finish_reason"] in {"stop", "length"}
    assert all(c.get("usage") is None for c in chunks)


@pytest.mark.parametrize(
    ("body", "status", "needles"),
    [
        ({"messages": []}, 422, ["messages"]),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, ["role"]),
        ({"messages": [{"role": "user"}]}, 422, ["content"]),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 422, ["content"]),
        ({"model": "nope"}, 404, ["nope"]),
        ({"model": "Bad Name!"}, 422, ["task name"]),
        ({"max_tokens": 25}, 422, ["limit of 24"]),
        ({"max_tokens": 5, "max_completion_tokens": 6}, 422, ["differ"]),
        ({"n": 0}, 422, ["n"]),
        ({"temperature": 3}, 422, ["temperature"]),
        ({"logprobs": True}, 422, ["logprobs"]),
        ({"tools": [{"type": "function"}]}, 422, ["tools"]),
        ({"presence_penalty": 0.5}, 422, ["presence_penalty"]),
        ({"stop": ["", "x"]}, 422, ["stop"]),
        ({"messages": [{"role": "user", "content": "word " * 80}]}, 422, ["limit is 160"]),
    ],
)
def test_bad_requests(
    client: TestClient, body: dict[str, Any], status: int, needles: list[str]
) -> None:
    expect(_chat(client, **body), status, *needles)


def test_text_parts_are_joined(client: TestClient) -> None:
    parts = [{"type": "text", "text": "the quick "}, {"type": "text", "text": "brown fox"}]
    messages = [CHAT[0], {"role": "user", "content": parts}]
    joined = _chat(client, max_tokens=6).json()
    r = client.post(
        "/v1/chat/completions",
        json={"model": "alpha", "messages": messages, "max_tokens": 6},
        headers=CLIENT,
    )
    assert r.json()["choices"] == joined["choices"]


def test_client_key_required(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "alpha", "messages": CHAT})
    assert r.status_code == 401


def test_backbone_without_chat_template_is_a_clear_400(
    tiny_gpt2_dir: Path, gpt2_backbone: Backbone, tmp_path: Path
) -> None:
    with TestClient(
        create_app(_settings(tiny_gpt2_dir, tmp_path)), raise_server_exceptions=False
    ) as c:
        _register(c, gpt2_backbone)
        error = expect(_chat(c), 400, "no chat template", "/v1/completions")
        assert error["code"] == "no_chat_template"


def test_openai_client_against_a_server_on_a_gguf_file(
    chat_llama_dir: Path,
    chat_llama: Backbone,
    tmp_path: Path,
    server_factory: Any,
) -> None:
    gguf = write_tiny_llama_gguf(chat_llama_dir, tmp_path / "chat.gguf")
    server = server_factory(
        server_env(gguf, data_dir=tmp_path / "data", gguf_cache_dir=tmp_path / "cache")
    )
    with httpx.Client(base_url=server.url) as http:
        info = http.get("/v1/info", headers=CLIENT).json()
        assert info["backbone"]["fingerprint"] == chat_llama.fingerprint  # GGUF = its HF copy
        _register(http, chat_llama)
    client = OpenAI(base_url=f"{server.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    out = client.chat.completions.create(model="beta", messages=CHAT, max_tokens=9, temperature=0)  # type: ignore[arg-type]
    expected = _expected(chat_llama, "beta", CHAT, 9)
    assert expected is None or out.choices[0].message.content == expected
    assert out.choices[0].finish_reason in {"stop", "length"}
    assert out.usage is not None and out.usage.completion_tokens <= 9
    pieces = list(
        client.chat.completions.create(
            model="beta",
            messages=CHAT,  # type: ignore[arg-type]
            max_completion_tokens=9,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert pieces[0].choices[0].delta.role == "assistant"
    text = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    assert text == out.choices[0].message.content
    assert pieces[-1].usage is not None and pieces[-1].usage.total_tokens == out.usage.total_tokens


def test_chat_requests_are_in_the_metrics(client: TestClient) -> None:
    assert _chat(client, max_tokens=2).status_code == 200
    lines = [
        line
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("rankone_http_requests_total") and "/v1/chat/completions" in line
    ]
    assert any('status="200"' in line and float(line.split()[-1]) >= 1 for line in lines), lines


def _prefix_lookups(c: TestClient) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(c.get("/metrics").text):
        if family.name == "rankone_prefix_cache_lookups":
            for s in family.samples:
                found[(s.labels["kind"], s.labels["result"])] = s.value
    return found


def test_prefix_cache_lookups_are_in_the_metrics(client: TestClient, chat_llama: Backbone) -> None:
    """A task's first request misses its prompt prefix; the same request again finds the
    prompt's and the input's prefixes: /metrics counts each."""
    r = client.post(
        "/v1/tasks", json=task_body(chat_llama, "prefix-metrics", seed=7), headers=ADMIN
    )
    assert r.status_code == 201, r.text
    before = _prefix_lookups(client)
    body = {"model": "prefix-metrics", "messages": CHAT, "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=body, headers=CLIENT).status_code == 200
    first = _prefix_lookups(client)
    assert first[("prompt", "miss")] == before[("prompt", "miss")] + 1
    assert first[("prompt", "hit")] == before[("prompt", "hit")]
    assert client.post("/v1/chat/completions", json=body, headers=CLIENT).status_code == 200
    second = _prefix_lookups(client)
    assert second[("prompt", "hit")] == first[("prompt", "hit")] + 1
    assert second[("input", "hit")] == first[("input", "hit")] + 1
    text = client.get("/metrics").text
    entries = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("rankone_prefix_cache_entries ")
    )
    assert entries >= 2  # the task's prompt and its latest input
