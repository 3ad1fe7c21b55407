"""bench/gpu_decode runs on any torch device: here on the CPU over a tiny Llama (no graph)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu_decode


def test_report_on_a_tiny_llama(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_decode, "RESULTS", tmp_path)
    monkeypatch.setattr(
        "sys.argv",
        ["gpu_decode", "--device", "cpu", "--model", str(tiny_llama_dir), "--rows", "1", "3"],
    )
    gpu_decode.main()
    r = json.loads((tmp_path / "gpu_decode.json").read_text())
    names = {"hf f32", "fused f32", "hf bf16 model", "fused bf16 model"}
    names |= {f"fused f32 + {w} weights" for w in ("bf16", "int8", "int4")}
    names |= {"fused f32, graphs", "fused bf16 model, graphs"}
    names |= {"fused f32 + bf16 weights, graphs", "fused f32 + int4 weights, graphs"}
    assert set(r["step_ms_by_rows"]) == names
    for name in names:
        assert set(r["step_ms_by_rows"][name]) == {"1", "3"}
        assert all(ms > 0 for ms in r["step_ms_by_rows"][name].values())
        by_ms = {n: int(n) / (ms / 1e3) for n, ms in r["step_ms_by_rows"][name].items()}
        assert r["tok_s_by_rows"][name] == pytest.approx(by_ms)
    # the fused forwards' step alone: eager only off CUDA
    assert set(r["forward_step_ms_by_rows"]) == {
        n for n in names if n.startswith("fused") and "graphs" not in n
    }
    assert set(r["forward_step_ms_by_rows"]["fused f32"]["3"]) == {"eager"}
    assert r["graphs_off"] == {}  # no capture off a GPU, so none failed
    text = (tmp_path / "gpu_decode.md").read_text()
    assert "| rows | hf f32 | fused f32 |" in text and "no graph" in text


def test_graph_cells() -> None:
    assert gpu_decode.graph_cells({"eager": 20.0, "graph": 4.0}, 8) == "20.00 | 4.00 (2,000)"
    assert gpu_decode.graph_cells({"eager": 20.0, "graph_error": "E: x"}, 8) == "20.00 | E: x"


def test_smollm2_shape_is_smollm2s() -> None:
    shape = gpu_decode.SMOLLM2_SHAPE
    d, layers, inter, vocab = (
        shape["hidden_size"],
        shape["num_hidden_layers"],
        shape["intermediate_size"],
        shape["vocab_size"],
    )
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * inter + 2 * d
    params = layers * per_layer + vocab * d + d  # tied head
    assert 134e6 < params < 135e6  # SmolLM2-135M: 134,515,008 parameters
