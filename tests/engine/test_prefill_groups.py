"""What the engine admits together is prefilled in groups of like lengths: a forward pads its
rows to the longest, so a cold task's prompt + input beside warm rows' inputs (or a long input
beside short ones) splits where the padding would cost more than one more forward."""

from __future__ import annotations

import pytest

from prompts import Backbone
from service.engine import prefill as prefill_module
from service.engine.decode import DecodeLoop
from service.engine.prefill import fixed_positions, forward_positions, split_by_length
from service.engine.prefix_cache import PrefixCache
from tests.engine.conftest import TEXTS, make_tasks, request, row


def test_split_by_length_weighs_padding_against_a_forward() -> None:
    assert split_by_length([12, 12, 12], 50.0) == [0, 3]  # like lengths: one forward
    assert split_by_length([112, 12, 12, 12], 50.0) == [0, 1, 4]  # 300 padded > 50
    assert split_by_length([112, 12], 150.0) == [0, 2]  # 100 padded < a forward's 150
    assert split_by_length([112, 100, 12, 11], 5.0) == [0, 1, 2, 4]  # 12 and 1 padded: 1 < 5
    assert split_by_length([7], 0.0) == [0, 1]


def test_a_forward_s_fixed_cost_in_positions(backbones: dict[str, Backbone]) -> None:
    # a + c · n with a = 20 ms, c = 0.5 ms: the fixed cost is 40 positions' worth
    assert fixed_positions({8: 0.024, 64: 0.052}) == pytest.approx(40.0)
    assert fixed_positions({64: 0.052, 8: 0.024}) == pytest.approx(40.0)
    assert fixed_positions({8: 0.020, 64: 0.020}) is None  # flat (a GPU): never split
    assert fixed_positions({8: 0.001, 64: 0.1}) == 0.0  # all work: never negative
    # a real forward's is timed once and kept
    forward = DecodeLoop(backbones["llama"]).forward
    got = forward_positions(forward, backbones["llama"])
    assert got is None or got >= 0
    assert prefill_module._FORWARD_POSITIONS[forward] == got


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_cold_task_beside_warm_rows_is_its_own_forward_and_exact(
    backbones: dict[str, Backbone], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a forward worth a few positions, a cold task ([P; x]) admitted beside warm rows
    (x alone) is prefilled in a forward of its own, the warm rows together in another; every
    answer equals the no-cache path's."""
    backbone = backbones[kind]
    tasks = make_tasks(backbone)
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24))
    plain = DecodeLoop(backbone, prefix_cache=None)
    monkeypatch.setitem(prefill_module._FORWARD_POSITIONS, loop.prefill.forward, 1.0)
    sizes: list[int] = []
    prefill = loop.prefill.forward.prefill

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        if counting:
            sizes.append(int(args[0].shape[0]))
        return prefill(*args, **kwargs)

    monkeypatch.setitem(vars(loop.prefill.forward), "prefill", counted)

    def run(dl: DecodeLoop, pairs: list[tuple[int, str]]) -> list[list[int]]:
        rows = [
            row(request(backbone, tasks[t], text, f"r{i}", max_new_tokens=5))
            for i, (t, text) in enumerate(pairs)
        ]
        dl.admit([r for r, _ in rows])
        while dl.running:
            dl.step()
        return [s.result.token_ids for _, s in rows]

    counting = False
    run(loop, [(0, TEXTS[0])])  # task 0 is warm from here on
    counting = True
    group = [(0, TEXTS[1]), (1, TEXTS[2]), (0, TEXTS[3])]  # task 1 is cold
    got = run(loop, group)
    counting = False
    assert got == run(plain, group)
    assert sorted(sizes) == [1, 2]  # the cold row alone, the two warm rows together


def test_the_engine_times_a_forward_before_serving(backbones: dict[str, Backbone]) -> None:
    """The engine's model thread times a prefill forward's fixed cost first, so that no
    request waits for it (a seq2seq engine's groups are never split: nothing is timed)."""
    import asyncio

    from service.engine.continuous import ContinuousEngine

    async def main(kind: str) -> bool:
        engine = ContinuousEngine(backbones[kind], prefix_cache_bytes=1 << 20)
        forward = engine.loop_core.forward  # built once per model: forget its timing
        prefill_module._FORWARD_POSITIONS.pop(forward, None)
        await engine.start()
        # one row: its admission times nothing itself
        await engine.generate(
            request(backbones[kind], make_tasks(backbones[kind])[0], TEXTS[0], "a")
        )
        timed = forward in prefill_module._FORWARD_POSITIONS
        await engine.shutdown()
        return timed

    assert asyncio.run(main("llama"))
    assert not asyncio.run(main("t5"))
