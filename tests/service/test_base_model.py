"""The base model as a model: ``/v1/models`` lists it (its id and ``base``), chat and completions
with that ``model`` run the backbone with no soft prompt, in the same batches as tasks, and
answer what HF ``generate`` answers on the input alone; no task may take its names."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from prompts import Backbone, load_backbone
from prompts.chat import chat_input_ids
from tests.gguf_files import build_tiny_tied_llama
from tests.service.conftest import (
    ADMIN,
    ADMIN_KEY,
    CLIENT,
    CLIENT_KEY,
    app_client,
    task_body,
)
from tests.service.test_api_errors import expect

BASE_ID = "llama"  # the model directory's name
CHAT = [{"role": "user", "content": "the quick brown fox"}]
TEXTS = ["the quick brown fox", "question: what is", "a b c d e"]


def plain_generate(bb: Backbone, ids: Sequence[int], max_new_tokens: int) -> str | None:
    """HF ``generate`` on the token ids alone (greedy); None on a near tie of the top two."""
    x = torch.tensor([list(ids)])
    with torch.inference_mode():
        out = bb.model.generate(  # type: ignore[operator]
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=bb.tokenizer.pad_token_id,
        )
    tokens: list[int] = out.sequences[0, len(ids) :].tolist()
    eos = bb.tokenizer.eos_token_id
    if eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    for scores in out.scores[: len(tokens) + 1]:
        top = scores[0].float().topk(2).values
        if float(top[0] - top[1]) <= 1e-5 * float(top.abs().max()) + 1e-4:
            return None
    return str(bb.tokenizer.decode(tokens, skip_special_tokens=True))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tied_llama(tmp_path_factory.mktemp("base") / BASE_ID, seed=3)


@pytest.fixture(scope="module")
def llama(llama_dir: Path) -> Backbone:
    return load_backbone(llama_dir)


@pytest.fixture(scope="module")
def client(
    llama_dir: Path, llama: Backbone, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    with app_client(
        llama_dir,
        llama,
        tmp_path_factory.mktemp("base-data"),
        {"alpha": {"seed": 0}},
        admin_keys=[ADMIN_KEY, "adm-scoped:team-*"],
        client_keys=[CLIENT_KEY, "sk-team:team-*", "sk-base:base"],
        max_wait_ms=100,
    ) as c:
        yield c


def test_models_lists_the_base_model_first_then_the_tasks(client: TestClient) -> None:
    data = client.get("/v1/models", headers=CLIENT).json()["data"]
    assert [m["id"] for m in data] == [BASE_ID, "base", "alpha"]
    assert data[0]["parent"] is None and data[2]["parent"] == BASE_ID
    scoped = client.get("/v1/models", headers={"Authorization": "Bearer sk-team"}).json()
    assert scoped["data"] == []  # a scoped key sees the base model only if its patterns match
    only_base = client.get("/v1/models", headers={"Authorization": "Bearer sk-base"}).json()
    assert [m["id"] for m in only_base["data"]] == ["base"]


@pytest.mark.parametrize("model", [BASE_ID, "base"])
def test_base_model_completions_and_chat_equal_plain_generate(
    client: TestClient, llama: Backbone, model: str
) -> None:
    """Base and task requests sent together (they share batches): every base answer is HF
    ``generate`` on the input alone."""

    def completion(text: str, task: str) -> Any:
        body = {"model": task, "prompt": text, "max_tokens": 10, "temperature": 0}
        return client.post("/v1/completions", json=body, headers=CLIENT)

    def chat(task: str) -> Any:
        body = {"model": task, "messages": CHAT, "max_tokens": 10, "temperature": 0}
        return client.post("/v1/chat/completions", json=body, headers=CLIENT)

    with ThreadPoolExecutor(8) as pool:
        plain = [pool.submit(completion, t, model) for t in TEXTS]
        tasks = [pool.submit(completion, t, "alpha") for t in TEXTS]
        chats = [pool.submit(chat, model), pool.submit(chat, "alpha")]
        answers = [f.result() for f in [*plain, *tasks, *chats]]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    compared = 0
    for text, r in zip(TEXTS, answers[:3], strict=True):
        assert r.json()["model"] == model
        expected = plain_generate(llama, llama.tokenizer(text)["input_ids"], 10)
        if expected is not None:
            assert r.json()["choices"][0]["text"] == expected, text
            compared += 1
    expected = plain_generate(llama, chat_input_ids(llama.tokenizer, CHAT), 10)
    if expected is not None:
        assert answers[6].json()["choices"][0]["message"]["content"] == expected
        compared += 1
    assert compared >= 2
    # the task's soft prompt changes the answers: base and task rows were not confused
    assert [r.json()["choices"][0]["text"] for r in answers[:3]] != [
        r.json()["choices"][0]["text"] for r in answers[3:6]
    ]


def test_base_model_streams(client: TestClient) -> None:
    body = {"model": "base", "prompt": TEXTS[0], "max_tokens": 6, "temperature": 0}
    whole = client.post("/v1/completions", json=body, headers=CLIENT).json()
    r = client.post("/v1/completions", json={**body, "stream": True}, headers=CLIENT)
    assert r.status_code == 200
    assert '"finish_reason":' in r.text and r.text.rstrip().endswith("data: [DONE]")
    assert whole["choices"][0]["text"]


def test_base_model_limits_and_empty_input(client: TestClient) -> None:
    body = {"model": "base", "prompt": "", "max_tokens": 4}
    error = expect(client.post("/v1/completions", json=body, headers=CLIENT), 422, "non-empty")
    assert error["code"] == "empty_input"
    too_many = {"model": "base", "prompt": "x", "max_tokens": 10_000}
    expect(client.post("/v1/completions", json=too_many, headers=CLIENT), 422, "limit of 256")
    scoped = {"Authorization": "Bearer sk-team"}
    expect(client.post("/v1/completions", json=body, headers=scoped), 403, "scoped")


@pytest.mark.parametrize("name", ["base", BASE_ID])
def test_no_task_takes_the_base_model_names(client: TestClient, llama: Backbone, name: str) -> None:
    r = client.post("/v1/tasks", json=task_body(llama, name, seed=1), headers=ADMIN)
    error = expect(r, 422, "reserved", "base model")
    assert error["code"] == "invalid_name"
    put = client.put(f"/v1/tasks/{name}", json=task_body(llama, name, seed=1), headers=ADMIN)
    assert put.status_code in {404, 422}, put.text  # no such task, and none can be made
    files = {"file": ("train.jsonl", b'{"input": "a", "target": "b"}\n' * 4)}
    f = client.post("/v1/files", files=files, data={"purpose": "fine-tune"}, headers=ADMIN)
    assert f.status_code == 200, f.text
    job = {"model": "family", "training_file": f.json()["id"], "suffix": name}
    r = client.post("/v1/fine_tuning/jobs", json=job, headers=ADMIN)
    expect(r, 422, "base model")


def test_ignore_eos_reaches_the_engine_from_every_route(client: TestClient) -> None:
    """``ignore_eos`` (vLLM's extension) maps onto the engine's parameter from completions,
    chat and the native route (the engines' behaviour: tests/service/test_static_engine.py);
    a non-boolean is a 422 naming the field."""
    from service.protocol.chat import ChatCompletionRequest
    from service.protocol.generate import GenerationParameters
    from service.protocol.openai import CompletionRequest

    completion = CompletionRequest.model_validate(
        {"model": "base", "prompt": "x", "ignore_eos": True}
    )
    chat = ChatCompletionRequest.model_validate(
        {"model": "base", "messages": CHAT, "ignore_eos": True}
    )
    native = GenerationParameters.model_validate({"ignore_eos": True})
    for params in (completion.parameters(), chat.parameters(), native):
        assert params.to_sampling_params(8).ignore_eos
    assert not GenerationParameters().to_sampling_params(8).ignore_eos
    body = {"model": "base", "prompt": "x", "max_tokens": 4, "ignore_eos": True}
    r = client.post("/v1/completions", json=body, headers=CLIENT)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    r = client.post("/v1/completions", json={**body, "ignore_eos": "yes"}, headers=CLIENT)
    assert r.status_code == 422 and "ignore_eos" in r.text
