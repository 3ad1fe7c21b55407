"""Validation before anything is written or run, through the routes (TestClient + lifespan,
tiny GPT-2): strict types, bounded metadata, composed prompts within the backbone's range,
the position table, page offsets, one poisoned task among innocent requests, closable docs."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from prompts import Backbone
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
    write_overflowing_task,
)

LONG = 500  # prompt rows of the "long" family: 12 positions of GPT-2's 512 remain


@pytest.fixture(scope="module")
def client(
    tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory, gpt2_backbone: Backbone
) -> Iterator[TestClient]:
    settings = Settings(
        model=str(tiny_gpt2_dir),
        data_dir=str(tmp_path_factory.mktemp("data")),
        admin_keys=[ADMIN_KEY],
        client_keys=[CLIENT_KEY],
        default_max_new_tokens=32,
        max_new_tokens_limit=64,
        log_level="WARNING",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        for sp in (shared_prompt(gpt2_backbone), shared_prompt(gpt2_backbone, "long", length=LONG)):
            assert c.post("/v1/shared-prompts", json=shared_body(sp), headers=ADMIN).is_success
        assert c.post("/v1/tasks", json=task_body(gpt2_backbone, "basic", seed=0), headers=ADMIN)
        g = torch.Generator().manual_seed(5)
        long_task = {
            "name": "long",
            "shared": "long",
            "u": (torch.randn(LONG, 1, generator=g) * 0.5).tolist(),
            "v": torch.randn(1, gpt2_backbone.dim, generator=g).tolist(),
        }
        assert c.post("/v1/tasks", json=long_task, headers=ADMIN).status_code == 201
        yield c


def error(response: Any, status: int, *needles: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    for needle in needles:
        assert needle.lower() in body["message"].lower(), (needle, body["message"])
    return str(body["code"])


def generate(c: TestClient, task: str, body: dict[str, Any]) -> Any:
    return c.post(f"/v1/tasks/{task}/generate", json=body, headers=CLIENT)


# -- strict types ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": "hi", "stream": 0},
        {"inputs": "hi", "parameters": {"max_new_tokens": "5"}},
        {"inputs": "hi", "parameters": {"max_new_tokens": True}},
        {"inputs": "hi", "parameters": {"temperature": "0.5"}},
        {"inputs": 5},
    ],
)
def test_generation_types_are_not_coerced(client: TestClient, body: dict[str, Any]) -> None:
    assert error(generate(client, "basic", body), 422) == "invalid_request"


def test_completion_types_are_not_coerced(client: TestClient) -> None:
    body = {"model": "basic", "prompt": "hi", "stream": 0}
    r = client.post("/v1/completions", json=body, headers=CLIENT)
    error(r, 422, "stream")


def test_boolean_factor_values_are_refused(client: TestClient, gpt2_backbone: Backbone) -> None:
    body = {**task_body(gpt2_backbone, "bools", seed=1), "u": [[True]] * PROMPT_LENGTH}
    error(client.post("/v1/tasks", json=body, headers=ADMIN), 422, "u.", "valid number")
    assert client.get("/v1/tasks/bools", headers=ADMIN).status_code == 404


@pytest.mark.parametrize(
    ("parameters", "needle"),
    [
        ({"repetition_penalty": 5e-324}, "repetition_penalty"),
        ({"temperature": 1e300}, "temperature"),
    ],
)
def test_extreme_sampling_floats_are_refused(
    client: TestClient, parameters: dict[str, Any], needle: str
) -> None:
    error(generate(client, "basic", {"inputs": "hi", "parameters": parameters}), 422, needle)


def test_a_temperature_below_epsilon_is_greedy(client: TestClient) -> None:
    greedy = generate(client, "basic", {"inputs": "a b c", "parameters": {"max_new_tokens": 6}})
    tiny = generate(
        client,
        "basic",
        {"inputs": "a b c", "parameters": {"max_new_tokens": 6, "temperature": 1e-45}},
    )
    assert greedy.status_code == tiny.status_code == 200, tiny.text
    assert tiny.json()["texts"] == greedy.json()["texts"]


# -- metadata --------------------------------------------------------------------------------


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("metadata", "needle"),
    [
        (_nested(300), "deeper than 8"),
        ({"blob": "x" * 20_000}, "16384 bytes"),
        ({"score": math.nan}, "finite"),
        ({"score": [1, {"x": -math.inf}]}, "finite"),
    ],
)
def test_bad_metadata_is_refused_and_nothing_is_written(
    client: TestClient, gpt2_backbone: Backbone, metadata: dict[str, Any], needle: str
) -> None:
    body = {**task_body(gpt2_backbone, "meta", seed=2), "metadata": metadata}
    # json.dumps writes NaN / -Infinity literals, as a careless client would
    content = json.dumps(body).encode()
    r = client.post(
        "/v1/tasks", content=content, headers={**ADMIN, "content-type": "application/json"}
    )
    error(r, 422, needle)
    assert client.get("/v1/tasks/meta", headers=ADMIN).status_code == 404
    page = client.get("/v1/tasks", headers=ADMIN)
    assert page.status_code == 200 and "meta" not in {t["name"] for t in page.json()["tasks"]}


def test_shared_prompt_metadata_is_bounded_too(client: TestClient, gpt2_backbone: Backbone) -> None:
    body = shared_body(shared_prompt(gpt2_backbone, "deep"), metadata=_nested(20))
    error(client.post("/v1/shared-prompts", json=body, headers=ADMIN), 422, "deeper")


# -- composed prompt -------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e20, 1e6])
def test_factors_whose_product_overflows_are_refused(
    client: TestClient, gpt2_backbone: Backbone, scale: float
) -> None:
    """Each factor is finite; at 1e20 their product is not (float32), at 1e6 it is finite but
    its rows are far longer than anything the backbone's embeddings hold."""
    body = task_body(gpt2_backbone, "huge", seed=3)
    body["u"] = [[scale]] * PROMPT_LENGTH
    body["v"] = [[scale] * gpt2_backbone.dim]
    error(client.post("/v1/tasks", json=body, headers=ADMIN), 422, "composed prompt", "scale")
    assert client.get("/v1/tasks/huge", headers=ADMIN).status_code == 404
    # a replace is checked the same way, and leaves version 1 in place
    put = client.put(
        "/v1/tasks/basic", json={k: v for k, v in body.items() if k != "name"}, headers=ADMIN
    )
    error(put, 422, "composed prompt")
    assert client.get("/v1/tasks/basic", headers=ADMIN).json()["version"] == 1


# -- positions -------------------------------------------------------------------------------


def _ids(bb: Backbone, text: str) -> int:
    return len(bb.tokenizer(text)["input_ids"])


def test_input_past_the_position_table_is_refused_with_the_numbers(
    client: TestClient, gpt2_backbone: Backbone
) -> None:
    text = "the quick brown fox jumps over the lazy dog"
    n = _ids(gpt2_backbone, text)
    assert LONG + n > 512
    r = generate(client, "long", {"inputs": text})
    error(r, 422, f"prompt ({LONG} rows)", f"input ({n} tokens)", "512")


def test_every_position_that_fits_is_used(client: TestClient, gpt2_backbone: Backbone) -> None:
    text = "a b"
    room = 512 - LONG - _ids(gpt2_backbone, text) + 1  # the last new token needs no position
    over = generate(client, "long", {"inputs": text, "parameters": {"max_new_tokens": room + 1}})
    error(over, 422, f"at most {room} new tokens")
    exact = generate(client, "long", {"inputs": text, "parameters": {"max_new_tokens": room}})
    assert exact.status_code == 200, exact.text
    assert exact.json()["outputs"][0]["completion_tokens"] <= room
    # a defaulted max_new_tokens (32) is lowered to what fits instead of refused
    default = generate(client, "long", {"inputs": text})
    assert default.status_code == 200, default.text
    out = default.json()["outputs"][0]
    assert out["completion_tokens"] <= room
    assert out["finish_reason"] == "stop" or out["completion_tokens"] == room


# -- listing ---------------------------------------------------------------------------------


def test_the_last_page_says_next_offset_null(client: TestClient) -> None:
    page = client.get("/v1/tasks", params={"limit": 1000}, headers=ADMIN).json()
    assert "next_offset" in page and page["next_offset"] is None


@pytest.mark.parametrize(
    ("params", "needle"),
    [({"offset": 2**63}, "offset"), ({"offset": -1}, "offset"), ({"limt": 5}, "limt")],
)
def test_bad_page_parameters_are_422(
    client: TestClient, params: dict[str, Any], needle: str
) -> None:
    error(client.get("/v1/tasks", params=params, headers=ADMIN), 422, needle)


def test_a_huge_offset_on_redis_is_422_not_503(
    tiny_gpt2_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(model=str(tiny_gpt2_dir), redis_url=redis_url, log_level="WARNING")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        error(c.get("/v1/tasks", params={"offset": 2**62}), 422, "offset")
        beyond = c.get("/v1/tasks", params={"offset": 2**53})
        assert beyond.status_code == 200 and beyond.json()["tasks"] == []
        metrics = c.get("/metrics").text
        assert "rankone_store_errors_total 0.0" in metrics


# -- one poisoned task among innocent requests ----------------------------------------------


def test_a_poisoned_task_fails_alone_and_innocent_requests_answer_200(
    client: TestClient, gpt2_backbone: Backbone
) -> None:
    """A task written behind the validation (straight into the store) whose composed prompt
    overflows: its requests get 422 generation_failed; concurrent requests of another task
    answer 200 with exactly their alone-result."""
    write_overflowing_task(client, gpt2_backbone)
    texts = ["a b c", "the quick brown fox", "question: what is", "hello there"]
    alone = [generate(client, "basic", {"inputs": t}).json()["texts"] for t in texts]
    calls = [("basic", t) for t in texts] + [("poison", "a b c")] * 2
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(lambda c: generate(client, c[0], {"inputs": c[1]}), calls))
    for answer, expected in zip(answers[: len(texts)], alone, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["texts"] == expected
    for answer in answers[len(texts) :]:
        assert error(answer, 422, "non-finite", "poison") == "generation_failed"


# -- docs ------------------------------------------------------------------------------------


def test_docs_are_open_by_default(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200


def test_docs_can_be_closed(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        model=str(tiny_gpt2_dir),
        data_dir=str(tmp_path),
        client_keys=[CLIENT_KEY],
        admin_keys=[ADMIN_KEY],
        docs_open=False,
        log_level="WARNING",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.get(path, headers=CLIENT).status_code == 200
        assert c.get("/openapi.json", headers=ADMIN).json()["info"]["title"] == "rankone"
