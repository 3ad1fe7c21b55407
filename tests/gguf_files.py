"""Tiny GGUF files written locally with the ``gguf`` package, the way llama.cpp's converter does.

``write_tiny_llama_gguf`` turns a tiny Hugging Face Llama (tied embeddings and a chat template,
like SmolLM2) into a ``.gguf`` file whose dequantized weights are the model's own (F32) or a
Q8_0 rounding of them, so the GGUF tests run in a second instead of a minute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.tiny_models import bpe_tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def build_tiny_tied_llama(path: Path, *, d_model: int = 64, seed: int = 0) -> Path:
    """A tiny Llama directory with tied embeddings and a chat template (SmolLM2's shape)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = bpe_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (rotary halves interleaved); transformers undoes it."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _gguf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    state = {k: v.float().numpy() for k, v in load_file(model_dir / "model.safetensors").items()}
    out = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        for hf, gg in _LAYER_NAMES.items():
            w = state[f"model.layers.{i}.{hf}"]
            if hf.startswith("self_attn.q_proj"):
                w = _permute(w, config.num_attention_heads)
            elif hf.startswith("self_attn.k_proj"):
                w = _permute(w, config.num_key_value_heads)
            out[f"blk.{i}.{gg}"] = w
    return out


def write_tiny_llama_gguf(model_dir: Path, out: Path, *, quant: str = "F32") -> Path:
    """Write the Llama in ``model_dir`` as the GGUF file ``out``; 2-D weights as ``quant``."""
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    from gguf.quants import quantize
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    qtype = GGMLQuantizationType[quant]
    writer = GGUFWriter(str(out), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    _add_tokenizer(writer, tok, TokenType)
    for name, weights in _gguf_tensors(model_dir).items():
        if weights.ndim == 2 and qtype != GGMLQuantizationType.F32:
            writer.add_tensor(name, quantize(weights, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, weights.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _add_tokenizer(writer, tok, token_type) -> None:  # type: ignore[no-untyped-def]
    import json

    backend = json.loads(tok.backend_tokenizer.to_str())
    vocab: dict[str, int] = backend["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tok.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [token_type.CONTROL if t in special else token_type.NORMAL for t in tokens]
    )
    merges = backend["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_unk_token_id(tok.unk_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok.chat_template)
