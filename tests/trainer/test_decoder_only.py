"""Decoder-only backbones: label alignment under padding, and teach → evaluate from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prompts import load_backbone
from tests.trainer.conftest import FAST, run_cli
from trainer.data import Tokenized
from trainer.forward import collate, prompted_forward
from trainer.generate import greedy


def test_padded_batch_matches_each_row_alone(gentle_gpt2: Path) -> None:
    backbone = load_backbone(gentle_gpt2)
    rows = [Tokenized([5, 6, 7, 8], [9, 10, 2]), Tokenized([11], [12, 2])]
    prompts = torch.randn(2, 3, backbone.dim)  # [B, L, d]
    batch = collate(rows, [0, 1], causal=True, pad_id=backbone.tokenizer.pad_token_id)
    out = prompted_forward(backbone, prompts, batch, hidden=True)
    assert out.targets.tolist() == [9, 10, 2, 12, 2]
    expected = []
    for b, row in enumerate(rows):
        ids = torch.tensor([row.input_ids + row.target_ids])
        embeds = torch.cat([prompts[b : b + 1], backbone.embed(ids)], dim=1)  # [1, L + T, d]
        logits = backbone.model(inputs_embeds=embeds).logits[0]
        first = 3 + len(row.input_ids) - 1  # the position that predicts the first target token
        expected.append(logits[first : first + len(row.target_ids)])
    torch.testing.assert_close(out.logits, torch.cat(expected), atol=1e-4, rtol=1e-4)
    assert out.hidden is not None and out.hidden.shape == (4 + 3 + 1 + 2, backbone.dim)


def test_greedy_matches_a_full_forward_per_step(gentle_gpt2: Path) -> None:
    backbone = load_backbone(gentle_gpt2)
    prompt = torch.randn(1, 3, backbone.dim)
    inputs = [[5, 6, 7], [11]]
    got = greedy(backbone, prompt.expand(2, -1, -1), inputs, 4)
    for row, ids in zip(inputs, got, strict=True):
        seq = list(row)
        for _ in range(len(ids)):
            embeds = torch.cat([prompt, backbone.embed(torch.tensor([seq]))], dim=1)
            seq.append(int(backbone.model(inputs_embeds=embeds).logits[0, -1].argmax()))
        assert seq[len(row) :] == ids


def test_all_stages_on_a_decoder_only_backbone(
    gentle_gpt2: Path, toy_data: Path, tmp_path: Path
) -> None:
    common = ["--model", gentle_gpt2, "--data-dir", toy_data, *FAST]
    run_cli(
        "teach",
        *common,
        "--tasks",
        "polarity",
        "first",
        "--steps",
        "10",
        "--out",
        tmp_path / "teach",
    )
    records = [
        json.loads(line) for line in (tmp_path / "teach" / "log.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in records if r["run"] == "teach-polarity"]
    assert sum(losses[-3:]) < sum(losses[:3])
    run_cli(
        "distill",
        *common,
        "--tasks",
        "polarity",
        "first",
        "--steps",
        "3",
        "--teachers",
        tmp_path / "teach",
        "--out",
        tmp_path / "mpt",
    )
    assert "hidden_mse" in (tmp_path / "mpt" / "log.jsonl").read_text()
    run_cli(
        "adapt",
        *common,
        "--tasks",
        "last",
        "--steps",
        "2",
        "--source",
        tmp_path / "mpt",
        "--out",
        tmp_path / "adapt",
    )
    run_cli(
        "evaluate",
        "--model",
        gentle_gpt2,
        "--data-dir",
        toy_data,
        "--tasks",
        "polarity",
        "last",
        "--methods",
        f"pt={tmp_path / 'teach'}",
        f"mpt={tmp_path / 'adapt'}",
        "--max-new-tokens",
        "3",
        "--eval-limit",
        "4",
        "--out",
        tmp_path / "eval",
    )
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]
    assert set(results) == {"none", "pt", "mpt"}
    assert results["pt"]["polarity"]["examples"] == 4 and set(results["mpt"]) == {"last"}
