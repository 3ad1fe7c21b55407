"""Tiny backbones with a gentle init, so prompt-tuning losses start near log(vocab) and fall.

The session fixtures in tests/conftest.py build models with a wide init (for varied greedy
decoding); their logits are huge (cross-entropy in the hundreds), which hides whether a
prompt learns. These use the models' default init.
"""

from __future__ import annotations

from pathlib import Path

import torch


def build_gentle_t5(path: Path, *, d_model: int = 32, seed: int = 0) -> Path:
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tok = ByT5Tokenizer()
    config = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    T5ForConditionalGeneration(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_gentle_gpt2(path: Path, *, d_model: int = 32, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tiny_models import _bpe_tokenizer

    torch.manual_seed(seed)
    tok = _bpe_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=d_model,
        n_layer=2,
        n_head=4,
        n_positions=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
