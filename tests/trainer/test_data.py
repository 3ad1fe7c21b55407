"""Pure helpers: JSONL reading, few-shot sampling, task mixing, padding and loss masks, metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.data import (
    Example,
    MixtureSampler,
    Tokenized,
    few_shot,
    read_jsonl,
    task_probabilities,
)
from trainer.errors import TrainerError
from trainer.forward import IGNORE, collate
from trainer.loop import lr_factor
from trainer.metrics import score
from trainer.options import TrainOptions


def test_read_jsonl_skips_blank_lines_and_ignores_extra_keys(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"input": "a", "target": "b", "id": 1}\n\n{"input": "c", "target": ""}\n')
    assert read_jsonl(path) == [Example("a", "b"), Example("c", "")]


@pytest.mark.parametrize("line", ['["a", "b"]', '{"input": 1, "target": "b"}', '{"target": "b"}'])
def test_read_jsonl_rejects_non_examples(tmp_path: Path, line: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n' + line + "\n")
    with pytest.raises(TrainerError, match=r"train\.jsonl:2"):
        read_jsonl(path)


def test_few_shot_is_seeded_and_per_task() -> None:
    examples = [Example(str(i), str(i)) for i in range(50)]
    a = few_shot(examples, 8, seed=1, task="t")
    assert len(a) == 8 and a == few_shot(examples, 8, seed=1, task="t")
    assert a != few_shot(examples, 8, seed=2, task="t")
    assert few_shot(examples, 100, seed=1, task="t") == examples


@pytest.mark.parametrize(("temperature", "expected"), [(1.0, [0.9, 0.1]), (1e9, [0.5, 0.5])])
def test_task_probabilities(temperature: float, expected: list[float]) -> None:
    assert task_probabilities([900, 100], temperature) == pytest.approx(expected, abs=1e-6)


def test_sampler_is_a_pure_function_of_the_step_and_shards_by_rank() -> None:
    a = MixtureSampler([10, 3], temperature=1.0, seed=0, rank=0, world=2)
    b = MixtureSampler([10, 3], temperature=1.0, seed=0, rank=1, world=2)
    assert a.batch(5, 16) == a.batch(5, 16)
    rows_a = {row for i in range(20) for row in a.batch(i, 8)}
    rows_b = {row for i in range(20) for row in b.batch(i, 8)}
    assert all(j % 2 == 0 for _, j in rows_a) and all(j % 2 == 1 for _, j in rows_b)


def test_collate_masks_pads_and_non_target_tokens() -> None:
    rows = [Tokenized([1, 2, 3], [4, 5]), Tokenized([6], [7])]
    s2s = collate(rows, [0, 1], causal=False, pad_id=0)
    assert s2s.input_ids.tolist() == [[1, 2, 3], [6, 0, 0]]
    assert s2s.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert s2s.labels.tolist() == [[4, 5], [7, IGNORE]]
    causal = collate(rows, [0, 1], causal=True, pad_id=0)
    assert causal.input_ids.tolist() == [[1, 2, 3, 4, 5], [0, 0, 0, 6, 7]]
    assert causal.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert causal.labels.tolist() == [[IGNORE] * 3 + [4, 5], [IGNORE] * 4 + [7]]
    assert causal.target_tokens == 3 and torch.equal(causal.task_index, torch.tensor([0, 1]))


def test_lr_schedule_warms_up_then_decays() -> None:
    opts = TrainOptions(model="m", data_dir=Path("d"), out=Path("o"), steps=10, warmup_steps=2)
    factors = [lr_factor(s, opts) for s in range(10)]
    assert factors[0] < factors[1] < factors[2] == 1.0 and factors[-1] < factors[3]


def test_scores() -> None:
    result = score(["The cat", "dog", "a b"], ["cat", "Dog", "a c"])
    assert result["exact_match"] == pytest.approx(200 / 3)
    assert result["accuracy"] == pytest.approx(0.0)
    assert 0 < result["f1"] < 100
