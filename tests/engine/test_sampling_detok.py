"""Pure sampling filters, incremental detokenization and stop strings."""

from __future__ import annotations

import pytest
import torch

from service.engine.base import SamplingParams
from service.engine.detok import IncrementalDetokenizer, find_stop, stable_end
from service.engine.sampling import (
    apply_repetition_penalty,
    choose_tokens,
    filter_top_k_top_p,
    make_generator,
)


@pytest.mark.parametrize(
    ("top_k", "top_p", "survivors"),
    [
        (0, 1.0, [0, 1, 2, 3]),
        (1, 1.0, [3]),
        (2, 1.0, [2, 3]),
        (0, 0.5, [3]),
        (0, 0.7, [2, 3]),
        (3, 0.01, [3]),
    ],
)
def test_filter_top_k_top_p(top_k: int, top_p: float, survivors: list[int]) -> None:
    logits = torch.log(torch.tensor([0.1, 0.1, 0.3, 0.5]))
    out = filter_top_k_top_p(logits, top_k, top_p)
    assert torch.isfinite(out).nonzero().flatten().tolist() == survivors


@pytest.mark.parametrize(("seen", "expected"), [([], [2.0, -2.0, 1.0]), ([0, 1], [1.0, -4.0, 1.0])])
def test_repetition_penalty(seen: list[int], expected: list[float]) -> None:
    out = apply_repetition_penalty(
        torch.tensor([2.0, -2.0, 1.0]), torch.tensor(seen, dtype=torch.long), 2.0
    )
    assert out.tolist() == expected


def test_choose_tokens_empty_batch_and_greedy() -> None:
    assert choose_tokens(torch.zeros(0, 5), [], [], []) == []
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert choose_tokens(
        logits, [SamplingParams()] * 2, [torch.zeros(0, dtype=torch.long)] * 2, [None, None]
    ) == [1, 0]


def test_seeded_sampling_is_independent_of_neighbours() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7)
    empty = torch.zeros(0, dtype=torch.long)
    fallback = torch.Generator().manual_seed(0)

    def draw(rows: list[int]) -> list[int]:
        gens = [make_generator(7 if r == 0 else None, torch.device("cpu"), fallback) for r in rows]
        out = []
        for _ in range(5):
            out.append(
                choose_tokens(logits[rows], [params] * len(rows), [empty] * len(rows), gens)[0]
            )
        return out

    assert draw([0]) == draw([0, 1, 2]) == draw([0, 2])


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [("", ["x"], None), ("hello world", ["wor"], 6), ("abc", ["c", "b"], 1), ("abc", [""], None)],
)
def test_find_stop(text: str, stops: list[str], expected: int | None) -> None:
    assert find_stop(text, stops) == expected


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("", [], 0),
        ("abc", [], 3),
        ("abc\ufffd", [], 3),
        ("hello wo", ["world"], 6),
        ("hello", ["lo!", "xyz"], 3),
        ("ab", ["abc"], 0),
    ],
)
def test_stable_end(text: str, stops: list[str], expected: int) -> None:
    assert stable_end(text, stops) == expected


class CharTokenizer:
    """Token i decodes to chr(i); 0 is special; 1000 then 1001 are the two halves of "é"."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = ""
        for j, i in enumerate(ids):
            if i == 1000:
                out += "é" if ids[j + 1 : j + 2] == [1001] else "\ufffd"
            elif i != 0 and i != 1001:
                out += chr(i)
        return out


def test_detokenizer_holds_back_partial_chars_and_stops() -> None:
    detok = IncrementalDetokenizer(CharTokenizer(), stops=["XY"])
    deltas = [
        detok.add(t)
        for t in [ord("a"), 1000, 1001, ord("X"), ord("b"), ord("X"), ord("Y"), ord("c")]
    ]
    assert deltas[:3] == ["a", "", "é"]
    assert deltas[3] == ""  # "X" may start the stop string
    assert deltas[4] == "Xb"
    assert deltas[6] == "" and detok.stopped
    assert detok.text == "aéXb"
    assert "".join(deltas[:7]) + detok.flush() == detok.text
