"""The asyncio engine around the decode loop: streaming, cancellation, overload, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from prompts import Backbone
from service.engine.base import EngineClosedError, GenerationRequest, QueueFullError, SamplingParams
from service.engine.continuous import ContinuousEngine
from tests.engine.conftest import TEXTS, make_tasks, reference_generate, request


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def started(backbone: Backbone, **kwargs) -> ContinuousEngine:
    engine = ContinuousEngine(backbone, **kwargs)
    await engine.start()
    return engine


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_concurrent_requests_match_generate_and_stream_equals_generate(
    backbones: dict[str, Backbone], kind: str
) -> None:
    backbone = backbones[kind]
    tasks = make_tasks(backbone)

    async def main():
        engine = await started(backbone, max_batch_size=3)
        # by default the Llama's decode steps replay CUDA graphs on a GPU (RANKONE_CUDA_GRAPHS)
        graphed = kind == "llama" and backbone.device.type == "cuda"
        assert engine.forward_kind.endswith("+graphs") == graphed, engine.forward_kind
        reqs = [
            request(backbone, tasks[i % 4], TEXTS[i % 4], f"r{i}", max_new_tokens=6 + 3 * i)
            for i in range(5)
        ]
        first = [asyncio.create_task(engine.generate(r)) for r in reqs[:3]]
        await asyncio.sleep(0.05)  # the rest join a batch already decoding
        later = [asyncio.create_task(engine.generate(r)) for r in reqs[3:]]
        results = await asyncio.gather(*first, *later)
        deltas = [d async for d in engine.stream(reqs[4])]
        await engine.shutdown()
        return reqs, results, deltas

    reqs, results, deltas = run(main())
    for req, res in zip(reqs, results, strict=True):
        assert res.token_ids == reference_generate(
            backbone, req.task, req.input_ids, req.params.max_new_tokens
        )
    streamed = results[4]
    assert deltas[-1].result == streamed
    assert "".join(d.text for d in deltas) == streamed.text
    assert [t for d in deltas for t in d.token_ids] == streamed.token_ids


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(
    backbones: dict[str, Backbone],
) -> None:
    backbone = backbones["gpt2"]
    tasks = make_tasks(backbone)
    sampled = request(
        backbone,
        tasks[0],
        TEXTS[0],
        "s",
        max_new_tokens=12,
        temperature=1.0,
        top_p=0.9,
        top_k=50,
        seed=1234,
        repetition_penalty=1.2,
    )

    async def main():
        engine = await started(backbone)
        alone = await engine.generate(sampled)
        neighbours = [
            request(backbone, tasks[i], TEXTS[i], f"n{i}", max_new_tokens=5 + i, temperature=0.8)
            for i in range(1, 4)
        ]
        crowded = await asyncio.gather(*(engine.generate(r) for r in [*neighbours, sampled]))
        other_seed = await engine.generate(
            GenerationRequest(
                "o",
                sampled.task,
                sampled.input_ids,
                SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=99),
            )
        )
        await engine.shutdown()
        return alone, crowded[-1], other_seed

    alone, crowded, other = run(main())
    assert alone.token_ids == crowded.token_ids
    assert alone.token_ids != other.token_ids


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_stop_sequence_trims_output(backbones: dict[str, Backbone], kind: str) -> None:
    backbone = backbones[kind]
    task = make_tasks(backbone)[1]

    async def main():
        engine = await started(backbone)
        full = await engine.generate(request(backbone, task, TEXTS[0], max_new_tokens=16))
        text = full.text
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        cut = await engine.generate(
            request(backbone, task, TEXTS[0], max_new_tokens=16, stop=(stop,))
        )
        deltas = [
            d
            async for d in engine.stream(
                request(backbone, task, TEXTS[0], max_new_tokens=16, stop=(stop,))
            )
        ]
        await engine.shutdown()
        return full, stop, cut, deltas

    full, stop, cut, deltas = run(main())
    assert stop and len(full.text) > 4
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert "".join(d.text for d in deltas) == cut.text


def test_closing_a_stream_cancels_its_row(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["gpt2"]
    task = make_tasks(backbone)[0]

    async def main():
        engine = await started(backbone)
        stream = engine.stream(request(backbone, task, TEXTS[0], max_new_tokens=400))
        got = [await stream.__anext__() for _ in range(3)]
        assert engine.running == 1
        await stream.aclose()
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        running = engine.running
        after = await engine.generate(request(backbone, task, TEXTS[1], max_new_tokens=3))
        await engine.shutdown()
        return got, running, after

    got, running, after = run(main())
    assert len(got) == 3 and running == 0
    assert after.completion_tokens == 3


def test_queue_full_raises(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["gpt2"]
    task = make_tasks(backbone)[0]

    async def main():
        engine = ContinuousEngine(backbone, queue_size=2)  # not started: nothing drains the queue
        streams = [engine.stream(request(backbone, task, TEXTS[0], f"q{i}")) for i in range(2)]
        assert engine.queue_depth == 2
        with pytest.raises(QueueFullError):
            engine.stream(request(backbone, task, TEXTS[0], "q2"))
        with pytest.raises(QueueFullError):
            await engine.generate(request(backbone, task, TEXTS[0], "q3"))
        await engine.shutdown(drain_timeout_s=0.01)  # the waiting ones end as cancelled
        for stream in streams:
            deltas = [d async for d in stream]
            assert deltas[-1].result.finish_reason == "cancelled"

    run(main())


def test_shutdown_drains_in_flight_then_refuses(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["llama"]
    tasks = make_tasks(backbone)

    async def main():
        engine = await started(backbone, max_batch_size=2)
        pending = [
            asyncio.create_task(
                engine.generate(request(backbone, tasks[i], TEXTS[i], f"d{i}", max_new_tokens=10))
            )
            for i in range(4)
        ]
        await asyncio.sleep(0)
        await asyncio.sleep(0.02)
        await engine.shutdown(drain_timeout_s=60)
        results = await asyncio.gather(*pending)
        with pytest.raises(EngineClosedError):
            await engine.generate(request(backbone, tasks[0], TEXTS[0]))
        return results

    results = run(main())
    assert [r.finish_reason for r in results] == ["length"] * 4


def test_shutdown_timeout_cancels_the_rest(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["gpt2"]
    task = make_tasks(backbone)[0]

    async def main():
        engine = await started(backbone, max_batch_size=1)
        pending = [
            asyncio.create_task(
                engine.generate(request(backbone, task, TEXTS[0], f"c{i}", max_new_tokens=400))
            )
            for i in range(2)
        ]
        await asyncio.sleep(0.05)
        await engine.shutdown(drain_timeout_s=0.05)
        return await asyncio.gather(*pending)

    results = run(main())
    assert {r.finish_reason for r in results} == {"cancelled"}


def test_idle_engine_gathers_a_burst_into_one_prefill(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["gpt2"]
    tasks = make_tasks(backbone)

    async def main():
        engine = await started(backbone, max_wait_ms=500, max_batch_size=3)
        pending = []
        for i in range(3):
            pending.append(
                asyncio.create_task(
                    engine.generate(
                        request(backbone, tasks[i], TEXTS[i], f"b{i}", max_new_tokens=3)
                    )
                )
            )
            await asyncio.sleep(0.02)
        await asyncio.gather(*pending)
        await engine.shutdown()
        return engine.loop_core.stats.prefills

    assert run(main()) == 1


@pytest.mark.parametrize("threads", [1, 2])
def test_the_model_thread_takes_the_torch_threads(
    backbones: dict[str, Backbone], threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's model thread runs torch on ``threads``; a server's event-loop thread runs
    it single-threaded (``reserve_for_model``) and gets its count back on ``release``."""
    import torch

    from service.engine import threads as model_threads

    backbone = backbones["llama"]
    seen: list[int] = []

    async def main() -> None:
        engine = await started(backbone, threads=threads)
        step = engine.loop_core.step

        def recording_step() -> int:
            seen.append(torch.get_num_threads())
            return step()

        monkeypatch.setattr(engine.loop_core, "step", recording_step)
        await engine.generate(
            request(backbone, make_tasks(backbone)[0], TEXTS[0], max_new_tokens=3)
        )
        await engine.shutdown()

    monkeypatch.setattr(model_threads, "_default", None)
    before = torch.get_num_threads()
    try:
        assert model_threads.reserve_for_model() == before
        assert torch.get_num_threads() == 1 and model_threads.model_thread_count() == before
        run(main())
        assert seen and set(seen) == {threads}
        assert torch.get_num_threads() == 1  # the model thread's setting is its own
    finally:
        model_threads.release()
    assert torch.get_num_threads() == before
