"""The static batching engine: pure helpers, and mixed-task batches equal to generate alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from prompts import Backbone, compose_prompt
from service.engine.base import (
    EngineClosedError,
    GenerationRequest,
    GenerationResult,
    ResolvedTask,
    SamplingParams,
)
from service.engine.static import StaticBatchEngine
from service.engine.static_batch import batch_prompts, group_key, pad_right, trim
from service.metrics import Metrics
from tests.service.conftest import factors, reference_text, shared_prompt


def _task(bb: Backbone, name: str, seed: int, rank: int = 1, sp_seed: int = 0) -> ResolvedTask:
    u, v = factors(bb, seed=seed, rank=rank)
    return ResolvedTask(name, 1, f"s{sp_seed}", shared_prompt(bb, seed=sp_seed).prompt, u, v)


@pytest.mark.parametrize(
    ("rows", "ids", "mask"),
    [
        ([[1, 2], [3]], [[1, 2], [3, 0]], [[1, 1], [1, 0]]),
        ([[], [4]], [[0], [4]], [[0], [1]]),
        ([[]], [[]], [[]]),
    ],
)
def test_pad_right(rows: list[list[int]], ids: list[list[int]], mask: list[list[int]]) -> None:
    got_ids, got_mask = pad_right(rows, 0)
    assert got_ids.tolist() == ids and got_mask.tolist() == mask


def _decode(tokens: list[int]) -> str:
    return "".join(chr(96 + t) for t in tokens)


@pytest.mark.parametrize(
    ("tokens", "params", "expected"),
    [
        ([1, 2, 3, 4], SamplingParams(max_new_tokens=3), ([1, 2, 3], "abc", "length")),
        ([1, 9, 3], SamplingParams(max_new_tokens=5), ([1], "a", "stop")),
        ([1, 2, 3, 4], SamplingParams(max_new_tokens=4, stop=("bc",)), ([1, 2, 3], "a", "stop")),
        ([1, 2, 9], SamplingParams(max_new_tokens=4, stop=("zz",)), ([1, 2], "ab", "stop")),
        ([], SamplingParams(max_new_tokens=4), ([], "", "length")),
    ],
)
def test_trim(
    tokens: list[int], params: SamplingParams, expected: tuple[list[int], str, str]
) -> None:
    assert trim(tokens, params, {9}, _decode) == expected


def test_group_keys(t5_backbone: Backbone) -> None:
    a, b = _task(t5_backbone, "a", 0), _task(t5_backbone, "b", 1)
    greedy = [
        GenerationRequest("1", a, [1]),
        GenerationRequest("2", b, [2], SamplingParams(max_new_tokens=9)),
    ]
    assert group_key(greedy[0]) == group_key(greedy[1])
    sampled = SamplingParams(temperature=0.7)
    assert group_key(GenerationRequest("3", a, [1], sampled)) == group_key(
        GenerationRequest("4", b, [1], sampled)
    )
    seeded = SamplingParams(temperature=0.7, seed=1)
    assert group_key(GenerationRequest("5", a, [1], seeded)) != group_key(
        GenerationRequest("6", a, [1], seeded)
    )


def test_batch_prompts_mixes_shared_prompts_and_ranks(t5_backbone: Backbone) -> None:
    tasks = [
        _task(t5_backbone, "a", 0),
        _task(t5_backbone, "b", 1, rank=3, sp_seed=1),
        _task(t5_backbone, "c", 2),
    ]
    requests = [GenerationRequest(str(i), t, [1]) for i, t in enumerate(tasks)]
    got = batch_prompts(requests, device=torch.device("cpu"), dtype=torch.float32)  # [3, L, d]
    for row, t in zip(got, tasks, strict=True):
        torch.testing.assert_close(row, compose_prompt(t.prompt, t.u, t.v))


async def _run_all(bb: Backbone, requests: list[GenerationRequest], metrics: Metrics) -> list:
    engine = StaticBatchEngine(
        bb, max_batch_size=8, max_wait_ms=50, queue_size=16, metrics=metrics.engine
    )
    await engine.start()
    try:
        return await asyncio.gather(*(engine.generate(r) for r in requests))
    finally:
        await engine.shutdown()
        with pytest.raises(EngineClosedError):
            await engine.generate(requests[0])


@pytest.mark.parametrize("which", ["t5", "gpt2"])
def test_mixed_task_batch_equals_generate_alone(
    which: str, t5_backbone: Backbone, gpt2_backbone: Backbone
) -> None:
    bb = t5_backbone if which == "t5" else gpt2_backbone
    texts = ["hello there", "the quick brown fox jumps", "a", "what is two plus two?"]
    tasks = [_task(bb, f"t{i}", seed=i, rank=1 + i % 2, sp_seed=i % 2) for i in range(4)]
    requests = [
        GenerationRequest(
            str(i),
            tasks[i],
            bb.tokenizer(texts[i])["input_ids"],
            SamplingParams(max_new_tokens=5 + 2 * i),
        )
        for i in range(4)
    ]
    metrics = Metrics()
    results = asyncio.run(_run_all(bb, requests, metrics))
    compared = 0
    for req, res, text in zip(requests, results, texts, strict=True):
        t = req.task
        expected = reference_text(bb, t.prompt, t.u, t.v, text, req.params.max_new_tokens)
        if expected is not None:
            compared += 1
            assert res.text == expected
        assert res.prompt_tokens == len(req.input_ids)
        assert res.completion_tokens <= req.params.max_new_tokens
    assert compared >= 3
    assert metrics.engine.generated_tokens._value.get() == sum(r.completion_tokens for r in results)


def test_seeded_sampling_is_reproducible(t5_backbone: Backbone) -> None:
    task = _task(t5_backbone, "s", seed=0)
    params = SamplingParams(max_new_tokens=8, temperature=1.5, top_k=20, seed=123)
    ids = t5_backbone.tokenizer("hello")["input_ids"]
    requests = [GenerationRequest(str(i), task, ids, params) for i in range(3)]
    results = asyncio.run(_run_all(t5_backbone, requests, Metrics()))
    assert len({tuple(r.token_ids) for r in results}) == 1


def test_both_engines_stop_on_the_model_configs_eos(tiny_gpt2_dir) -> None:
    """The EOS rule is the backbone's (``Backbone.eos_ids``), one for both engines: an id named
    only by the model config (not the generation config) ends a row in each."""
    from prompts import load_backbone
    from service.engine.decode import DecodeLoop
    from service.engine.static_batch import run_group
    from tests.engine.conftest import row

    bb = load_backbone(tiny_gpt2_dir)
    task = _task(bb, "t", seed=1)
    req = GenerationRequest("r", task, bb.tokenizer("the quick fox")["input_ids"])
    first = run_group(bb, [req])[0]
    assert isinstance(first, GenerationResult) and first.token_ids
    bb.model.config.eos_token_id = first.token_ids[0]  # the row's first token now ends it
    bb.model.generation_config.eos_token_id = bb.tokenizer.eos_token_id
    static = run_group(bb, [req])[0]
    loop = DecodeLoop(bb)
    continuous, sink = row(req)
    loop.admit([continuous])
    for got in (static, sink.result):
        assert isinstance(got, GenerationResult)
        assert (got.finish_reason, got.token_ids) == ("stop", [])


def test_both_engines_generate_past_eos_when_asked(tiny_gpt2_dir) -> None:
    """``ignore_eos`` (vLLM's): a row whose first token is EOS still generates max_new_tokens,
    the same tokens in both engines as with no EOS at all."""
    from prompts import load_backbone
    from service.engine.decode import DecodeLoop
    from service.engine.static_batch import run_group
    from tests.engine.conftest import row

    bb = load_backbone(tiny_gpt2_dir)
    task = _task(bb, "t", seed=1)
    ids = bb.tokenizer("the quick fox")["input_ids"]
    params = SamplingParams(max_new_tokens=6)
    first = run_group(bb, [GenerationRequest("r", task, ids, params)])[0]
    assert isinstance(first, GenerationResult) and first.finish_reason == "length"
    bb.model.config.eos_token_id = first.token_ids[0]  # the row's first token now ends it
    bb.model.generation_config.eos_token_id = first.token_ids[0]
    past = SamplingParams(max_new_tokens=6, ignore_eos=True)
    static = run_group(bb, [GenerationRequest("r", task, ids, past)])[0]
    stopped = run_group(bb, [GenerationRequest("r", task, ids, params)])[0]
    loop = DecodeLoop(bb)
    continuous, sink = row(GenerationRequest("r", task, ids, past))
    loop.admit([continuous])
    while not continuous.finished:
        loop.step()
    for got in (static, sink.result):
        assert isinstance(got, GenerationResult)
        assert (got.finish_reason, got.token_ids) == ("length", first.token_ids)
    assert isinstance(stopped, GenerationResult) and stopped.token_ids == []
