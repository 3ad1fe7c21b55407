"""A mixed batch of tasks decodes exactly as each request does alone (greedy, float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prompts import Backbone, compose_prompts, load_backbone, prepend_prompts

TEXTS = [
    "the quick brown fox",
    "question: what is two plus two? answer:",
    "sentiment: i loved",
    "summarize: one frozen transformer",
]
L, NEW_TOKENS = 4, 8


def _task_prompts(backbone: Backbone, count: int) -> torch.Tensor:
    """``count`` different task prompts [count, L, d] over two shared prompts, at embedding scale."""
    gen = torch.Generator().manual_seed(0)
    vocab = backbone.tokenizer.vocab_size if backbone.is_seq2seq else len(backbone.tokenizer)
    with torch.no_grad():
        shared = backbone.embed(torch.randint(3, vocab, (2, L), generator=gen))  # [2, L, d]
    index = torch.arange(count) % 2
    u = 1 + 0.5 * torch.randn(count, L, 1, generator=gen)  # [B, L, 1]
    v = 1 + 0.5 * torch.randn(count, 1, backbone.dim, generator=gen)  # [B, 1, d]
    return compose_prompts(shared, index, u, v)


def _generate(backbone: Backbone, texts: list[str], prompts: torch.Tensor) -> list[list[int]]:
    tok = backbone.tokenizer
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        embeds = backbone.embed(batch["input_ids"])
        inputs = prepend_prompts(
            embeds, batch["attention_mask"], prompts, causal=not backbone.is_seq2seq
        )
        out = backbone.model.generate(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    return out.tolist()


@pytest.fixture(scope="module", params=["t5", "gpt2", "llama"])
def backbone(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> Backbone:
    return load_backbone(tiny_model_dirs[request.param])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mixed_batch_equals_alone(backbone: Backbone, padding_side: str) -> None:
    backbone.tokenizer.padding_side = padding_side
    prompts = _task_prompts(backbone, len(TEXTS))
    batched = _generate(backbone, TEXTS, prompts)
    alone = [_generate(backbone, [text], prompts[i : i + 1])[0] for i, text in enumerate(TEXTS)]
    for i, tokens in enumerate(alone):
        assert batched[i][: len(tokens)] == tokens, f"request {i} differs in the mixed batch"
        # Rows that stopped early (EOS) are padded in the batch, never continued.
        assert all(t == backbone.tokenizer.pad_token_id for t in batched[i][len(tokens) :])
    # Different tasks and inputs decode differently: the comparison has something to catch.
    assert len({tuple(t) for t in alone}) > 1


def test_prompt_changes_the_output(backbone: Backbone) -> None:
    prompts = _task_prompts(backbone, 2)
    first = _generate(backbone, TEXTS[:1], prompts[:1])
    second = _generate(backbone, TEXTS[:1], prompts[1:])
    assert first != second


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_causal_forward_with_position_ids(
    tiny_model_dirs: dict[str, Path], which: str, padding_side: str
) -> None:
    """One forward over the padded batch, with prepend_prompts' positions, gives every row the
    next-token logits it has alone (what an engine's own decode loop relies on)."""
    backbone = load_backbone(tiny_model_dirs[which])
    tok = backbone.tokenizer
    tok.padding_side = padding_side
    prompts = _task_prompts(backbone, len(TEXTS))

    def last_logits(texts: list[str], rows: torch.Tensor) -> torch.Tensor:
        batch = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            inputs = prepend_prompts(
                backbone.embed(batch["input_ids"]), batch["attention_mask"], rows, causal=True
            )
            return backbone.model(**inputs._asdict(), use_cache=False).logits[:, -1]  # [B, V]

    batched = last_logits(TEXTS, prompts)
    for i, text in enumerate(TEXTS):
        alone = last_logits([text], prompts[i : i + 1])[0]
        torch.testing.assert_close(batched[i], alone, rtol=1e-4, atol=1e-4)
