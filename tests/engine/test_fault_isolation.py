"""One bad row never fails another: a poisoned request among innocent rows of other tasks ends
alone with its own error, and every innocent row yields exactly what it yields alone — for the
continuous and the static engine, seq2seq and decoder-only."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from prompts import Backbone
from service.engine.base import GenerationRequest, GenerationResult, ResolvedTask
from service.engine.continuous import ContinuousEngine
from service.engine.decode import DecodeLoop
from service.engine.sampling import NonFiniteLogitsError
from service.engine.static import StaticBatchEngine
from tests.engine.conftest import DEVICE, TEXTS, make_tasks, reference_generate, request, row


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def overflowing(task: ResolvedTask) -> ResolvedTask:
    """A task whose composed prompt overflows float32 (1e20 · 1e20 · P = inf)."""
    return dataclasses.replace(
        task,
        name="poison",
        u=torch.full_like(task.u, 1e20),
        v=torch.full_like(task.v, 1e20),
    )


def innocent_requests(backbone: Backbone, tasks: list[ResolvedTask]) -> list[GenerationRequest]:
    return [
        request(backbone, tasks[i], TEXTS[i], f"ok{i}", max_new_tokens=5 + 2 * i) for i in range(3)
    ]


async def _gather(engine, reqs: list[GenerationRequest]) -> list[GenerationResult | BaseException]:
    return await asyncio.gather(*(engine.generate(r) for r in reqs), return_exceptions=True)


def _engine(kind: str, backbone: Backbone):
    if kind == "continuous":
        return ContinuousEngine(backbone, max_batch_size=8, max_wait_ms=50)
    return StaticBatchEngine(backbone, max_batch_size=8, max_wait_ms=50)


@pytest.mark.parametrize("engine_kind", ["continuous", "static"])
@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_poisoned_factors_end_alone(
    backbones: dict[str, Backbone], kind: str, engine_kind: str
) -> None:
    backbone = backbones[kind]
    tasks = make_tasks(backbone)
    innocent = innocent_requests(backbone, tasks)
    poison = request(backbone, overflowing(tasks[0]), TEXTS[3], "bad", max_new_tokens=6)

    async def main():
        engine = _engine(engine_kind, backbone)
        await engine.start()
        alone = [await engine.generate(r) for r in innocent]
        mixed = await _gather(engine, [innocent[0], poison, innocent[1], innocent[2]])
        await engine.shutdown()
        return alone, mixed

    alone, mixed = run(main())
    assert isinstance(mixed[1], NonFiniteLogitsError), mixed[1]
    assert "poison" in str(mixed[1])
    got = [mixed[0], mixed[2], mixed[3]]
    assert all(isinstance(r, GenerationResult) for r in got), got
    assert [r.token_ids for r in got] == [r.token_ids for r in alone]  # type: ignore[union-attr]
    if engine_kind == "continuous":  # the decode loop is also held to generate alone
        for req, res in zip(innocent, got, strict=True):
            assert res.token_ids == reference_generate(  # type: ignore[union-attr]
                backbone, req.task, req.input_ids, req.params.max_new_tokens
            )


@pytest.mark.parametrize("engine_kind", ["continuous", "static"])
def test_overflowing_sampling_parameters_end_alone(
    backbones: dict[str, Backbone], engine_kind: str
) -> None:
    """A repetition penalty of 5e-324 overflows the seen tokens' logits: that row alone fails.
    A temperature of 1e-45 is below the sampling epsilon: that row is greedy, and succeeds."""
    backbone = backbones["gpt2"]
    tasks = make_tasks(backbone)
    innocent = innocent_requests(backbone, tasks)
    penalty = request(
        backbone, tasks[3], TEXTS[3], "pen", max_new_tokens=6, temperature=1.0,
        repetition_penalty=5e-324,
    )  # fmt: skip
    tiny_t = request(backbone, tasks[1], TEXTS[1], "tiny", max_new_tokens=6, temperature=1e-45)
    greedy_twin = request(backbone, tasks[1], TEXTS[1], "twin", max_new_tokens=6)

    async def main():
        engine = _engine(engine_kind, backbone)
        await engine.start()
        alone = [await engine.generate(r) for r in [*innocent, greedy_twin]]
        mixed = await _gather(engine, [*innocent, penalty, tiny_t])
        await engine.shutdown()
        return alone, mixed

    alone, mixed = run(main())
    assert isinstance(mixed[3], NonFiniteLogitsError), mixed[3]
    got = [*mixed[:3], mixed[4]]
    assert all(isinstance(r, GenerationResult) for r in got), got
    assert [r.token_ids for r in got] == [r.token_ids for r in alone]  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_a_failing_prefill_ends_its_group_only(backbones: dict[str, Backbone], kind: str) -> None:
    """A group whose prefill raises (a prompt of the wrong width) is admitted while a batch is
    decoding: the group's rows get the error, the running rows finish exactly as alone."""
    backbone = backbones[kind]
    tasks = make_tasks(backbone)
    loop = DecodeLoop(backbone)
    innocent = innocent_requests(backbone, tasks)
    pairs = [row(r) for r in innocent]
    loop.admit([r for r, _ in pairs[:2]])
    loop.step()
    wrong = dataclasses.replace(
        tasks[2], name="wrong-width", prompt=torch.randn(tasks[2].prompt.shape[0], backbone.dim + 1)
    )
    bad_row, bad_sink = row(request(backbone, wrong, TEXTS[2], "bad", max_new_tokens=4))
    failures: list[BaseException] = []
    bad_row.fail = failures.append
    loop.admit([bad_row, pairs[2][0]])  # one group: both fail, nothing else does
    while loop.running:
        loop.step()
    assert len(failures) == 1 and bad_sink.deltas == []
    assert pairs[2][1].result is None  # its group mate ended with the group (no result)
    for (_, sink), req in zip(pairs[:2], innocent[:2], strict=True):
        assert sink.result is not None
        assert sink.result.token_ids == reference_generate(
            backbone, req.task, req.input_ids, req.params.max_new_tokens
        )


def test_the_static_engine_serves_an_uneven_t5(tmp_path) -> None:
    """``generate``'s own cache fails on T5s with num_decoder_layers != num_layers (DESIGN §9);
    the static engine passes a cache of its own and matches the no-cache ground truth."""
    from prompts import load_backbone
    from tests.engine.conftest import reference_no_cache
    from tests.tiny_models import build_tiny_t5

    build_tiny_t5(tmp_path, d_model=32, num_layers=1, num_decoder_layers=3)
    backbone = load_backbone(tmp_path, device=DEVICE)
    tasks = make_tasks(backbone)
    reqs = [request(backbone, tasks[i], TEXTS[i], f"r{i}", max_new_tokens=6 + i) for i in range(3)]

    async def main():
        engine = StaticBatchEngine(backbone, max_batch_size=8, max_wait_ms=50)
        await engine.start()
        results = await _gather(engine, reqs)
        await engine.shutdown()
        return results

    for req, res in zip(reqs, run(main()), strict=True):
        assert isinstance(res, GenerationResult), res
        assert res.token_ids == reference_no_cache(
            backbone, req.task, req.input_ids, req.params.max_new_tokens
        )
