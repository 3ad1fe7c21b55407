"""bench/mpt_real: the task suite is deterministic and held out as documented; LoRA trains a copy;
the summary is mean ± std over seeds of the held-out mean."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.mpt_real.report import summarize
from bench.mpt_real.tasks import SOURCES, TARGETS, TASKS, documentation, generate, write_suite
from prompts import load_backbone
from tests.tiny_models import build_tiny_llama
from trainer.data import tokenize
from trainer.loop import TaskData
from trainer.options import TrainOptions

SIZES = {"train": 200, "validation": 12, "test": 24}


def test_suite_has_six_sources_and_four_targets_with_new_label_sets() -> None:
    assert len(SOURCES) >= 6 and len(TARGETS) >= 4 and not set(SOURCES) & set(TARGETS)
    source_labels = {y for t in SOURCES for _, y in generate(t, SIZES, 0)["train"]}
    # verdict and country_of answer with labels no source has; place and synonym reuse a
    # source's kind of answer (cities, words) in a new format/relation, by design.
    for task in ("verdict", "country_of"):
        labels = {y for _, y in generate(task, SIZES, 0)["test"]}
        assert not labels & source_labels, f"{task} shares answers with a source"
    assert len(documentation()) == len(TASKS)


def test_suite_is_deterministic_and_splits_are_disjoint(tmp_path: Path) -> None:
    write_suite(tmp_path / "a", SIZES)
    write_suite(tmp_path / "b", SIZES)
    for task in TASKS:
        for split in ("train", "validation", "test"):
            a = (tmp_path / "a" / task / f"{split}.jsonl").read_bytes()
            assert a == (tmp_path / "b" / task / f"{split}.jsonl").read_bytes()
        splits = generate(task, SIZES, 0)
        inputs = [{x for x, _ in splits[s]} for s in ("train", "validation", "test")]
        assert not inputs[0] & inputs[2] and not inputs[1] & inputs[2]
        assert all(len(x.split()) <= 12 for x, _ in splits["test"])  # short, no instruction
    for task in ("country_of", "synonym"):  # word-list targets: test entities never trained
        splits = generate(task, SIZES, 0)
        train_answers = {y for _, y in splits["train"]}
        assert not {y for _, y in splits["test"]} & train_answers


def test_a_larger_train_split_keeps_the_test_split() -> None:
    small = generate("place", {**SIZES, "train": 20}, 0)
    large = generate("place", SIZES, 0)
    assert small["test"] == large["test"] and small["validation"] == large["validation"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "llama", d_model=32)


def test_lora_trains_adapters_on_a_copy_and_keeps_the_best(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from bench.mpt_real.lora import train_lora
    from trainer.data import Example

    backbone = load_backbone(tiny_llama)
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    rows = [Example(x, y) for x, y in generate("verdict", SIZES, 0)["train"][:16]]
    tokens = tokenize(
        backbone.tokenizer, rows, max_input_length=32, max_target_length=8, causal=True
    )
    task = TaskData("verdict", tokens[:12], tokens[12:])
    opts = TrainOptions(steps=6, batch_size=4, lr=1e-2, eval_every=2, out=tmp_path)
    tuned, record = train_lora(backbone, task, opts, rank=2, out=tmp_path / "lora")
    assert record["trained_parameters"] == 2 * 2 * (2 * 32 + 32 + 16)  # q: 32→32, v: 32→16
    vals = [r["val_loss"] for r in record["history"] if "val_loss" in r]
    assert len(vals) == 3 and record["best_val_loss"] == min(vals)
    for k, v in backbone.model.state_dict().items():  # the shared backbone is untouched
        assert (v == before[k]).all(), k
    assert tuned.model is not backbone.model
    assert (tmp_path / "lora" / "log.jsonl").exists()


def test_summary_is_mean_and_std_of_the_held_out_mean() -> None:
    seeds = [dict.fromkeys(TARGETS, 10.0), dict.fromkeys(TARGETS, 30.0)]
    out = summarize(seeds)
    assert out["mean"] == 20.0 and out["seeds"] == 2
    assert out["std"] == pytest.approx(14.14, abs=0.01)
    assert out["per_task"] == dict.fromkeys(TARGETS, 20.0)
