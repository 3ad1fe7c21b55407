"""teach → distill → adapt → evaluate from the CLI on a tiny T5, and what each stage promises."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prompts import compose_prompt, load_artifact_dir
from tests.trainer.conftest import FAST, Pipeline, run_cli
from trainer.bank import PromptBank


def log(run_dir: Path, label: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["run"] == label]


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def test_teach_writes_servable_teachers_and_loss_falls(pipeline: Pipeline) -> None:
    found = load_artifact_dir(pipeline.teach)
    assert set(found.tasks) == {"polarity", "first"}
    assert set(found.shared) == {"pt-polarity", "pt-first"}
    for name, tf in found.tasks.items():
        assert tf.shared == f"pt-{name}"
        assert torch.equal(tf.u @ tf.v, torch.ones(6, tf.dim))  # identity factors: P_k = P
    records = log(pipeline.teach, "teach-polarity")
    assert mean(records[-4:], "loss") < mean(records[:4], "loss")
    run = json.loads((pipeline.teach / "run.json").read_text())
    assert run["stage"] == "teach" and run["backbone_fingerprint"] == found.tasks["first"].backbone
    assert (pipeline.teach / "loss.png").stat().st_size > 0


def test_distill_lowers_kl_to_the_teachers(pipeline: Pipeline) -> None:
    records = log(pipeline.distill, "distill")
    assert mean(records[-4:], "kl") < mean(records[:4], "kl")
    found = load_artifact_dir(pipeline.distill)
    assert list(found.shared) == ["mpt"]
    assert {tf.shared for tf in found.tasks.values()} == {"mpt"}
    run = json.loads((pipeline.distill / "run.json").read_text())
    assert run["metrics"]["best_val_loss"] is not None


def test_shared_prompt_starts_from_the_teachers_average(
    gentle_t5: Path, pipeline: Pipeline, tmp_path: Path
) -> None:
    run_cli(
        "distill",
        "--model",
        gentle_t5,
        "--data-dir",
        pipeline.data,
        *FAST,
        "--tasks",
        "polarity",
        "first",
        "--steps",
        "1",
        "--lr",
        "1e-12",
        "--lambda-hid",
        "0",
        "--factor-noise",
        "0",
        "--teachers",
        pipeline.teach,
        "--out",
        tmp_path,
    )
    teachers = load_artifact_dir(pipeline.teach).shared
    average = torch.stack([sp.prompt for sp in teachers.values()]).mean(0)
    assert torch.allclose(load_artifact_dir(tmp_path).shared["mpt"].prompt, average, atol=1e-6)


def test_factors_only_adaptation_changes_only_u_and_v(pipeline: Pipeline) -> None:
    source, adapted = load_artifact_dir(pipeline.distill), load_artifact_dir(pipeline.adapt)
    # P: the very same bytes as the served shared prompt.
    assert (pipeline.adapt / "shared" / "mpt.safetensors").read_bytes() == (
        pipeline.distill / "shared" / "mpt.safetensors"
    ).read_bytes()
    assert list(adapted.tasks) == ["last"]
    task = adapted.tasks["last"]
    assert task.shared == "mpt"
    u0 = torch.stack([tf.u for tf in source.tasks.values()]).mean(0)
    v0 = torch.stack([tf.v for tf in source.tasks.values()]).mean(0)
    assert not torch.equal(task.u, u0) and not torch.equal(task.v, v0)  # U, V trained
    run = json.loads((pipeline.adapt / "run.json").read_text())
    (metrics,) = run["metrics"].values()
    length, dim = task.u.shape[0], task.v.shape[1]
    assert metrics["trained_parameters"] == (length + dim) * task.rank


def test_adapt_starts_from_the_source_average(pipeline: Pipeline, tmp_path: Path) -> None:
    run_cli(
        "adapt",
        "--model",
        pipeline.model,
        "--data-dir",
        pipeline.data,
        *FAST,
        "--tasks",
        "last",
        "--steps",
        "1",
        "--lr",
        "1e-12",
        "--weight-decay",
        "0",
        "--source",
        pipeline.distill,
        "--out",
        tmp_path,
    )
    source = load_artifact_dir(pipeline.distill).tasks.values()
    task = load_artifact_dir(tmp_path).tasks["last"]
    assert torch.allclose(task.u, torch.stack([tf.u for tf in source]).mean(0), atol=1e-6)
    assert torch.allclose(task.v, torch.stack([tf.v for tf in source]).mean(0), atol=1e-6)


def test_paper_and_multi_target_modes_write_new_shared_prompts(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    common = [
        "--model",
        pipeline.model,
        "--data-dir",
        pipeline.data,
        *FAST,
        "--steps",
        "2",
        "--source",
        pipeline.distill,
    ]
    run_cli("adapt", *common, "--tasks", "last", "--train-shared", "--out", tmp_path / "paper")
    paper = load_artifact_dir(tmp_path / "paper")
    assert paper.tasks["last"].shared == "mpt-last"
    served = load_artifact_dir(pipeline.distill).shared["mpt"].prompt
    assert not torch.equal(paper.shared["mpt-last"].prompt, served)
    run_cli(
        "adapt",
        *common,
        "--tasks",
        "last",
        "first",
        "--mode",
        "multi-target",
        "--out",
        tmp_path / "mt",
    )
    mt = load_artifact_dir(tmp_path / "mt")
    assert list(mt.shared) == ["mpt-mt"]
    assert {tf.shared for tf in mt.tasks.values()} == {"mpt-mt"} and len(mt.tasks) == 2


def test_export_load_compose_gives_the_trained_prompt(pipeline: Pipeline) -> None:
    found = load_artifact_dir(pipeline.distill)
    tasks = {name: (tf.shared, tf.u, tf.v) for name, tf in found.tasks.items()}
    bank = PromptBank(
        {"mpt": found.shared["mpt"].prompt}, tasks, train_shared=False, train_factors=False
    )
    shared, factors = bank.export(found.tasks["first"].backbone, {})
    for k, tf in enumerate(factors):
        expected = compose_prompt(shared[0].prompt, tf.u, tf.v)
        assert torch.equal(bank(torch.tensor([k]))[0], expected)
        loaded = found.tasks[tf.name]
        assert torch.equal(compose_prompt(found.shared["mpt"].prompt, loaded.u, loaded.v), expected)


def test_evaluate_writes_table_json_and_chart(pipeline: Pipeline, tmp_path: Path) -> None:
    run_cli(
        "evaluate",
        "--model",
        pipeline.model,
        "--data-dir",
        pipeline.data,
        "--methods",
        f"mpt={pipeline.adapt}",
        f"pt={pipeline.teach}",
        "--max-new-tokens",
        "4",
        "--eval-limit",
        "4",
        "--out",
        tmp_path,
    )
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert set(results) == {"none", "mpt", "pt"}
    assert set(results["mpt"]) == {"last"} and set(results["pt"]) == {"first", "polarity"}
    assert set(results["none"]["first"]) >= {"exact_match", "accuracy", "f1"}
    assert "| mpt |" in (tmp_path / "eval.md").read_text()
    assert (tmp_path / "eval.png").stat().st_size > 0
