"""End to end on the real model (SmolLM2-135M-Instruct, from its GGUF file, float32): the loader,
the fingerprint, a served mixed-task batch of chat completions that equals HF ``generate`` alone
token for token, and the official ``openai`` client streaming a chat completion."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from openai import OpenAI
from safetensors import safe_open

from prompts import Backbone, SharedPrompt, compose_prompt, converted_copy, input_embeddings
from prompts.chat import chat_input_ids
from prompts.gguf import recorded_fingerprint
from tests.chat_reference import greedy_reference_ids
from tests.service.conftest import (
    ADMIN,
    CLIENT,
    CLIENT_KEY,
    ServerProcess,
    server_env,
    shared_body,
)

LENGTH = 8
TASKS = ["capital", "colour", "poem"]
MAX_NEW = 10
QUESTIONS = [
    "What is the capital of France?",
    "Name a colour of the sky.",
    "Say hello in French.",
]


def test_gguf_load_has_the_real_shape_and_the_fingerprint_of_its_copy(
    smollm2: Backbone, smollm2_gguf: Path
) -> None:
    config = smollm2.model.config
    assert (smollm2.kind, smollm2.dim, config.num_hidden_layers) == ("causal", 576, 30)
    assert config.vocab_size == 49152 and config.num_key_value_heads == 3
    assert smollm2.dtype == torch.float32 and smollm2.name == str(smollm2_gguf)
    copy = converted_copy(smollm2_gguf)  # a cache hit: the fixture converted or found it
    # recorded from the model transformers dequantized, before it was written out
    assert recorded_fingerprint(copy) == smollm2.fingerprint
    with safe_open(str(copy / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied: stored once
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(embedding, input_embeddings(smollm2.model).weight)
    assert (
        smollm2.model.lm_head.weight.data_ptr() == input_embeddings(smollm2.model).weight.data_ptr()
    )
    assert "<|im_start|>assistant" in smollm2.tokenizer.chat_template


def _task_factors(bb: Backbone, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-one factors near 1, so each task prompt is a small, distinct change of P."""
    g = torch.Generator().manual_seed(100 + index)
    u = 1 + 0.3 * torch.randn(LENGTH, 1, generator=g)  # [L, 1]
    v = 1 + 0.3 * torch.randn(1, bb.dim, generator=g)  # [1, d]
    return u, v


def _shared(bb: Backbone) -> SharedPrompt:
    """P = the embeddings of an instruction text (prompt tuning's text init)."""
    ids = bb.tokenizer(" Answer in one short sentence.", add_special_tokens=False).input_ids
    ids = (ids * LENGTH)[:LENGTH]
    prompt = input_embeddings(bb.model).weight[ids].detach().clone()  # [L, d]
    return SharedPrompt("smol", prompt, bb.fingerprint)


@pytest.fixture(scope="module")
def served(
    smollm2: Backbone, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("real-server")
    env = server_env(smollm2_gguf, data_dir=root / "data", max_wait_ms=200, max_batch_size=8)
    server = ServerProcess(env, root / "server.log").start(timeout=240)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert (
                http.post(
                    "/v1/shared-prompts", json=shared_body(_shared(smollm2)), headers=ADMIN
                ).status_code
                == 201
            )
            for index, name in enumerate(TASKS):
                u, v = _task_factors(smollm2, index)
                body = {"name": name, "shared": "smol", "u": u.tolist(), "v": v.tolist()}
                r = http.post("/v1/tasks", json=body, headers=ADMIN)
                assert r.status_code == 201, r.text
        yield server
    finally:
        server.stop()


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def test_server_reports_the_gguf_backbone(served: ServerProcess, smollm2: Backbone) -> None:
    info = httpx.get(f"{served.url}/v1/info", headers=CLIENT).json()
    assert info["backbone"]["fingerprint"] == smollm2.fingerprint
    assert info["backbone"]["d"] == 576
    assert info["forward"] == "fused"  # SmolLM2 is a Llama: the engine's fused forward


def test_mixed_task_chat_batch_equals_generate_alone(
    served: ServerProcess, smollm2: Backbone
) -> None:
    requests = [(TASKS[i % 3], QUESTIONS[(i + i // 3) % 3]) for i in range(6)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        "/v1/chat/completions",
                        json={
                            "model": task,
                            "messages": _messages(q),
                            "max_tokens": MAX_NEW,
                            "temperature": 0,
                        },
                        headers=CLIENT,
                    )
                    for task, q in requests
                )
            )

    responses = asyncio.run(send_all())
    shared = _shared(smollm2).prompt
    compared = 0
    for (task, question), response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        got = response.json()["choices"][0]["message"]["content"]
        u, v = _task_factors(smollm2, TASKS.index(task))
        ids = chat_input_ids(smollm2.tokenizer, _messages(question))
        expected = greedy_reference_ids(smollm2, compose_prompt(shared, u, v), ids, MAX_NEW)
        if expected is None:
            continue
        assert got == smollm2.tokenizer.decode(expected, skip_special_tokens=True), (task, question)
        compared += 1
    assert compared >= 4
    metrics = httpx.get(f"{served.url}/metrics").text
    assert _mixed_batches(metrics) > 0, "the concurrent requests never shared a batch"


def _mixed_batches(metrics: str) -> float:
    """How many forward batches held more than one task (from the batch_tasks histogram)."""
    values: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith('rankone_batch_tasks_bucket{le="1.0"}'):
            values["single"] = float(line.split()[-1])
        elif line.startswith("rankone_batch_tasks_count"):
            values["all"] = float(line.split()[-1])
    return values["all"] - values["single"]


def test_openai_client_chat_and_stream(served: ServerProcess) -> None:
    client = OpenAI(base_url=f"{served.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=120)
    messages: Any = _messages(QUESTIONS[0])
    out = client.chat.completions.create(
        model="capital", messages=messages, max_tokens=MAX_NEW, temperature=0
    )
    text = out.choices[0].message.content
    assert text and out.choices[0].finish_reason in {"stop", "length"}
    stream = client.chat.completions.create(
        model="capital", messages=messages, max_tokens=MAX_NEW, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
    assert json.loads(out.model_dump_json())["usage"]["prompt_tokens"] > 0


def test_base_model_beside_tasks_equals_plain_generate(
    served: ServerProcess, smollm2: Backbone
) -> None:
    """``model="base"`` (and the model's own id) next to task requests: the backbone alone,
    token for token what HF ``generate`` answers on the rendered conversation."""
    client = OpenAI(base_url=f"{served.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=120)
    models = [m.id for m in client.models.list()]
    assert models[:2] == ["SmolLM2-135M-Instruct.Q4_1", "base"] and set(TASKS) <= set(models)
    requests = [("base", QUESTIONS[0]), (TASKS[0], QUESTIONS[0]), (models[0], QUESTIONS[1])]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as http:
            return await asyncio.gather(
                *(
                    http.post(
                        "/v1/chat/completions",
                        json={"model": m, "messages": _messages(q), "max_tokens": MAX_NEW},
                        headers=CLIENT,
                    )
                    for m, q in requests
                )
            )

    responses = asyncio.run(send_all())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for (model, question), response in zip(requests, responses, strict=True):
        if model in TASKS:
            continue
        ids = chat_input_ids(smollm2.tokenizer, _messages(question))
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = smollm2.model.generate(  # type: ignore[operator]
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=MAX_NEW,
                do_sample=False,
            )[0, len(ids) :].tolist()
        eos = smollm2.tokenizer.eos_token_id
        out = out[: out.index(eos)] if eos in out else out
        expected = smollm2.tokenizer.decode(out, skip_special_tokens=True)
        assert response.json()["choices"][0]["message"]["content"] == expected, model
