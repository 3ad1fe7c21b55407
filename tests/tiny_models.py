"""Tiny Hugging Face models built locally (no hub access), shared by tests and benchmarks.

Each builder writes a complete model directory (config, weights, tokenizer) that
``prompts.load_backbone`` and ``from_pretrained`` load like any hub checkpoint. By default the
random weights get a wide init so greedy decoding does not collapse onto one token forever: the
reference checks need varied token streams to mean anything. ``wide_init=False`` keeps the
models' default init instead, whose cross-entropy starts near log(vocab), so training tests can
see a prompt learn (the wide init's losses are in the hundreds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "translate english to french: the house is blue",
    "question: what is two plus two? answer: four",
    "sentiment: i loved this movie, it was great",
    "summarize: rankone serves many tasks from one frozen transformer",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
    "prompt tuning learns soft prompts while the backbone stays frozen",
] * 20


def bpe_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def build_tiny_t5(
    path: Path, *, d_model: int = 64, seed: int = 0, wide_init: bool = True, **overrides: Any
) -> Path:
    """Tiny T5 with the byte-level ``ByT5Tokenizer`` (needs no vocab file).

    ``overrides`` replace config fields (e.g. ``num_decoder_layers=3`` for an uneven T5).
    """
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tok = ByT5Tokenizer()
    fields: dict[str, Any] = dict(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        initializer_factor=4.0 if wide_init else 1.0,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        # Tied embeddings scale the logits by d_model**-0.5: the gentle variant wants that.
        tie_word_embeddings=not wide_init,
    )
    model = T5ForConditionalGeneration(T5Config(**{**fields, **overrides})).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_gpt2(
    path: Path, *, d_model: int = 64, seed: int = 0, wide_init: bool = True, **overrides: Any
) -> Path:
    """Tiny GPT-2 with a small BPE; ``overrides`` replace config fields."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = bpe_tokenizer()
    fields: dict[str, Any] = dict(
        vocab_size=len(tok),
        n_embd=d_model,
        n_layer=2,
        n_head=4,
        n_positions=512,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.3 if wide_init else 0.02,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = GPT2LMHeadModel(GPT2Config(**{**fields, **overrides})).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_llama(path: Path, *, d_model: int = 64, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


BUILDERS = {"t5": build_tiny_t5, "gpt2": build_tiny_gpt2, "llama": build_tiny_llama}
