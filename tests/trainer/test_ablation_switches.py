"""The switches the MPT benchmark's ablations use, and the LM-head shortcut of decoder-only steps."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from prompts import load_backbone
from tests.trainer.conftest import FAST, Pipeline, run_cli
from trainer.data import Tokenized
from trainer.forward import collate, cross_entropy, prompted_forward


def _log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_distill_without_distillation_trains_on_ce_alone(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: Any
) -> None:
    import trainer.distill

    calls = []
    real = trainer.distill.prompted_forward
    monkeypatch.setattr(
        trainer.distill,
        "prompted_forward",
        lambda *a, **k: calls.append(1) or real(*a, **k),
    )
    run_cli(
        "distill",
        "--model", pipeline.model, "--data-dir", pipeline.data, *FAST,
        "--tasks", "polarity", "first", "--steps", "3", "--lr", "0.05",
        "--teachers", pipeline.teach, "--lambda-kl", "0", "--lambda-hid", "0",
        "--out", tmp_path / "no-distill",
    )  # fmt: skip
    rows = _log(tmp_path / "no-distill")
    assert len(rows) == 3
    for row in rows:
        assert "kl" not in row and "hidden_mse" not in row
        assert row["loss"] == row["ce"]
    assert len(calls) == 3  # the student's forward only: no teacher forward was run


def test_decoder_only_steps_compute_logits_only_at_the_target_end(gentle_gpt2: Path) -> None:
    backbone = load_backbone(gentle_gpt2)
    rows = [Tokenized([5, 6, 7, 8, 9, 10], [11, 2]), Tokenized([12], [13, 14, 2])]
    batch = collate(rows, [0, 1], causal=True, pad_id=backbone.tokenizer.pad_token_id)
    prompts = torch.randn(2, 3, backbone.dim)
    seen: list[Any] = []
    model: Any = backbone.model
    forward = model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("logits_to_keep"))
        return forward(*args, **kwargs)

    spy.__signature__ = inspect.signature(forward)  # type: ignore[attr-defined]
    model.forward = spy
    try:
        out = prompted_forward(backbone, prompts, batch)
    finally:
        model.forward = forward
    assert seen == [4]  # the longest target (3 tokens) + the position before it
    assert out.targets.tolist() == [11, 2, 13, 14, 2]
    assert out.logits.shape == (5, model.config.vocab_size)
    # the same logits as a forward over every position (test_decoder_only checks them per row)
    model.forward = forward
    assert torch.isfinite(cross_entropy(out))
