"""Loading the one frozen backbone, and its fingerprint.

A backbone is a Hugging Face seq2seq (T5, BART, ...) or decoder-only (GPT-2, Llama, ...) model,
chosen from its config. It is always frozen (``requires_grad=False``) and in eval mode: rankone
trains and serves prompts, never the model. Remote code is never trusted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from prompts.errors import RankoneError

BackboneKind = Literal["seq2seq", "causal"]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# Config fields that say what the network computes; everything else (paths, versions, dtype,
# generation defaults) may differ between two copies of the same backbone.
_FINGERPRINT_FIELDS = (
    "model_type",
    "vocab_size",
    "d_model",
    "hidden_size",
    "n_embd",
    "num_layers",
    "num_decoder_layers",
    "num_hidden_layers",
    "n_layer",
    "num_heads",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "d_ff",
    "intermediate_size",
    "d_kv",
    "is_encoder_decoder",
)


@dataclass
class Backbone:
    """The frozen model, its tokenizer and what the prompt code needs to know about it."""

    model: nn.Module
    tokenizer: Any
    kind: BackboneKind
    dim: int
    fingerprint: str
    name: str

    @property
    def is_seq2seq(self) -> bool:
        return self.kind == "seq2seq"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def served_name(self) -> str:
        """The model's id for clients: a hub id as given, a local directory or file by its
        name (a ``.gguf`` file without the extension)."""
        path = Path(self.name)
        if not path.exists():
            return self.name
        return path.name.removesuffix(".gguf") or self.name

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings [B, T, d] for ``input_ids`` [B, T]."""
        return input_embeddings(self.model)(input_ids)

    # The backbone's facts, read from its config and tokenizer here and nowhere else.

    @property
    def max_positions(self) -> int | None:
        """Rows of a decoder-only model's absolute position table: prompt rows + input tokens +
        generated tokens must fit in them. None for seq2seq (relative positions in T5; BART's
        encoder and decoder tables each hold far more than a request) or where the config
        names no table."""
        if self.is_seq2seq:
            return None
        config = _config(self.model)
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def eos_ids(self) -> frozenset[int]:
        """The tokens that end a generation: every id the generation config and the model
        config name (a chat model's end-of-turn besides its end-of-text), else the
        tokenizer's EOS. Both engines stop on exactly these."""
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), _config(self.model)):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                ids.update([int(eos)] if isinstance(eos, int) else (int(i) for i in eos))
        if not ids and getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    @property
    def decoder_layers(self) -> int:
        """Layers whose self-attention a decode step caches (a seq2seq model's decoder's)."""
        config = _config(self.model)
        if self.is_seq2seq:
            n = getattr(config, "num_decoder_layers", None) or getattr(
                config, "decoder_layers", None
            )
            return int(n or config.num_layers)
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        raise RankoneError(f"cannot tell the number of layers of {type(self.model).__name__}")

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template (None: the backbone cannot render a conversation)."""
        from prompts.chat import has_chat_template

        return str(self.tokenizer.chat_template) if has_chat_template(self.tokenizer) else None


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise RankoneError(f"{type(model).__name__} has no Hugging Face config")
    return config


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise RankoneError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from None


def backbone_kind(config: Any) -> BackboneKind:
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def input_embeddings(model: nn.Module) -> nn.Module:
    """The model's token-embedding module (its ``weight`` is [vocab, d])."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Module) or not isinstance(
        getattr(embeddings, "weight", None), Tensor
    ):
        raise RankoneError(
            f"{type(model).__name__} has no input-embedding module with a weight: "
            "rankone needs a Hugging Face model whose get_input_embeddings() returns one"
        )
    return embeddings


def _embedding_weight(model: nn.Module) -> Tensor:
    weight = input_embeddings(model).weight
    assert isinstance(weight, Tensor)  # checked by input_embeddings
    return weight


def backbone_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's architecture config and its input-embedding weights.

    The weights are hashed after rounding to bfloat16, so the same checkpoint loaded in float32
    or bfloat16 gets the same fingerprint (float16 loads of float32 weights almost always do).
    """
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise RankoneError(f"{type(model).__name__} has no Hugging Face config to fingerprint")
    config = hf_config.to_dict()
    arch = {k: config[k] for k in _FINGERPRINT_FIELDS if k in config}
    weight = _embedding_weight(model).detach()
    digest = hashlib.sha256()
    digest.update(json.dumps(arch, sort_keys=True).encode())
    digest.update(json.dumps(list(weight.shape)).encode())
    rounded = weight.to(device="cpu", dtype=torch.bfloat16).contiguous()
    digest.update(rounded.view(torch.int16).numpy().tobytes())
    return f"{arch.get('model_type', 'model')}-{digest.hexdigest()[:16]}"


def prompt_norm_bound(backbone: Backbone) -> float:
    """The longest composed prompt row a task may have on ``backbone``:
    ``PROMPT_NORM_FACTOR`` × the largest row norm of its input embeddings."""
    from prompts.artifacts import PROMPT_NORM_FACTOR

    weight = _embedding_weight(backbone.model)  # [V, d]
    with torch.no_grad():
        largest = float(weight.float().norm(dim=-1).max())
    return PROMPT_NORM_FACTOR * largest


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def is_gguf_path(source: str | Path) -> bool:
    """Whether ``source`` names a GGUF file (by its suffix; the content is checked on load)."""
    return str(source).lower().endswith(".gguf")


def load_backbone(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    local_files_only: bool | None = None,
    attn_implementation: str | None = None,
    gguf_cache_dir: str | Path | None = None,
) -> Backbone:
    """Load a frozen backbone from a local directory, a hub id or a ``.gguf`` file.

    ``local_files_only`` defaults to True for an existing local path. The model class
    (seq2seq or causal LM) is chosen from the config. A GGUF file is dequantized once into a
    cached safetensors copy (see ``prompts.gguf``; ``gguf_cache_dir`` overrides the cache
    location) and loaded from that copy, so both get the same fingerprint.
    """
    if is_gguf_path(name_or_path) or Path(name_or_path).expanduser().is_file():
        return _load_gguf(
            Path(name_or_path).expanduser(),
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            cache_dir=gguf_cache_dir,
        )
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    source = str(name_or_path)
    is_local = Path(source).exists()
    if local_files_only is None:
        local_files_only = is_local
    if not is_local and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise RankoneError(f"model path {source!r} does not exist")
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"local_files_only": local_files_only, "trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        kind = backbone_kind(config)
        auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        model_kwargs = dict(kwargs, dtype=torch_dtype)
        if attn_implementation:
            model_kwargs["attn_implementation"] = attn_implementation
        model: nn.Module = auto.from_pretrained(source, **model_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise RankoneError(f"cannot load backbone {source!r}: {e}") from e
    if tokenizer.pad_token_id is None:
        # Decoder-only checkpoints often ship without a pad token; padding is always masked.
        tokenizer.pad_token = tokenizer.eos_token
    model = freeze(model.to(device))
    dim = int(_embedding_weight(model).shape[1])
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        dim=dim,
        fingerprint=backbone_fingerprint(model),
        name=source,
    )


def _load_gguf(
    path: Path,
    *,
    device: str | torch.device,
    dtype: str | torch.dtype,
    attn_implementation: str | None,
    cache_dir: str | Path | None,
) -> Backbone:
    from prompts.gguf import converted_copy, recorded_fingerprint

    converted = converted_copy(path, cache_dir)
    backbone = load_backbone(
        converted, device=device, dtype=dtype, attn_implementation=attn_implementation
    )
    expected = recorded_fingerprint(converted)
    if backbone.fingerprint != expected:
        raise RankoneError(
            f"the cached copy {str(converted)!r} of {str(path)!r} has fingerprint "
            f"{backbone.fingerprint}, not the {expected} recorded when it was converted; "
            "delete that directory to convert the file again"
        )
    backbone.name = str(path)
    return backbone
