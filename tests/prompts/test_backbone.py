"""Backbone loading: kind, frozen, fingerprint, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prompts import RankoneError, backbone_fingerprint, load_backbone, resolve_dtype
from tests.tiny_models import build_tiny_gpt2


@pytest.mark.parametrize(
    ("which", "kind"), [("t5", "seq2seq"), ("gpt2", "causal"), ("llama", "causal")]
)
def test_kind_frozen_and_eval(tiny_model_dirs: dict[str, Path], which: str, kind: str) -> None:
    backbone = load_backbone(tiny_model_dirs[which])
    assert backbone.kind == kind
    assert backbone.is_seq2seq == (kind == "seq2seq")
    assert not backbone.model.training
    assert all(not module.training for module in backbone.model.modules())
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert backbone.dim == 64
    assert backbone.tokenizer.pad_token_id is not None
    ids = torch.tensor([[1, 2, 3]])
    assert backbone.embed(ids).shape == (1, 3, 64)
    assert backbone.fingerprint.startswith(backbone.model.config.model_type + "-")


def test_fingerprint_stable_across_reloads_and_dtypes(tiny_gpt2_dir: Path) -> None:
    first = load_backbone(tiny_gpt2_dir)
    again = load_backbone(tiny_gpt2_dir)
    bf16 = load_backbone(tiny_gpt2_dir, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert first.fingerprint == again.fingerprint == bf16.fingerprint
    assert backbone_fingerprint(first.model) == first.fingerprint


def test_fingerprint_differs_between_models(
    tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    other = build_tiny_gpt2(tmp_path / "gpt2-seed1", seed=1)
    prints = {
        load_backbone(other).fingerprint,
        *(load_backbone(path).fingerprint for path in tiny_model_dirs.values()),
    }
    assert len(prints) == 4


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RankoneError, match=r"model path .*nope.* does not exist"):
        load_backbone(tmp_path / "nope")


def test_directory_without_a_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RankoneError, match="cannot load backbone"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("name", ["float8", "int8", ""])
def test_bad_dtype_name(name: str, tiny_gpt2_dir: Path) -> None:
    with pytest.raises(RankoneError, match=f"unknown dtype '{name}'; use one of"):
        load_backbone(tiny_gpt2_dir, dtype=name)


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("fp32", torch.float32), ("BF16", torch.bfloat16), (torch.float16, torch.float16)],
)
def test_resolve_dtype(name: str | torch.dtype, dtype: torch.dtype) -> None:
    assert resolve_dtype(name) is dtype


def test_the_backbone_carries_its_facts(tiny_model_dirs: dict[str, Path]) -> None:
    t5, gpt2, llama = (load_backbone(tiny_model_dirs[k]) for k in ("t5", "gpt2", "llama"))
    assert t5.max_positions is None  # relative positions: no table to run out of
    assert gpt2.max_positions == gpt2.model.config.n_positions
    assert llama.max_positions == llama.model.config.max_position_embeddings
    assert t5.decoder_layers == t5.model.config.num_decoder_layers
    assert gpt2.decoder_layers == gpt2.model.config.n_layer
    assert llama.decoder_layers == llama.model.config.num_hidden_layers
    assert gpt2.eos_ids == {gpt2.tokenizer.eos_token_id}
    assert gpt2.chat_template is None


def test_eos_ids_join_both_configs_else_the_tokenizer(tiny_gpt2_dir: Path) -> None:
    """A chat model may name its end of turn in one config and its end of text in the other:
    generation ends on either (what generate does with the union passed as eos_token_id)."""
    backbone = load_backbone(tiny_gpt2_dir)
    backbone.model.generation_config.eos_token_id = [7, 9]
    backbone.model.config.eos_token_id = 3
    assert backbone.eos_ids == {3, 7, 9}
    backbone.model.generation_config.eos_token_id = None
    backbone.model.config.eos_token_id = None
    assert backbone.eos_ids == {backbone.tokenizer.eos_token_id}
