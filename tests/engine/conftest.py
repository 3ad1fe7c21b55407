"""Engine test fixtures: loaded tiny backbones, tasks with distinct factors, reference decoding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from prompts import Backbone, compose_prompt, load_backbone, prepend_prompts
from service.engine.base import GenerationRequest, GenerationResult, ResolvedTask, SamplingParams
from service.engine.decode import Row

PROMPT_LEN = 5
# The engine's tests run on this torch device: ``RANKONE_TEST_DEVICE=cuda pytest tests/engine``
# checks the GPU path (the same exactness assertions; CI has no GPU, so CI runs them on cpu).
DEVICE = os.environ.get("RANKONE_TEST_DEVICE", "cpu")
TEXTS = [
    "the quick brown fox",
    "question: what is",
    "a b c",
    "sentiment: i loved this movie, it was great",
]


@pytest.fixture(scope="session")
def backbones(tiny_t5_dir: Path, tiny_gpt2_dir: Path, tiny_llama_dir: Path) -> dict[str, Backbone]:
    return {
        "t5": load_backbone(tiny_t5_dir, device=DEVICE),
        "gpt2": load_backbone(tiny_gpt2_dir, device=DEVICE),
        "llama": load_backbone(tiny_llama_dir, device=DEVICE),
    }


@pytest.fixture(scope="session")
def q4_llama(tiny_llama_dir: Path) -> Backbone:
    """The tiny Llama with every decoder matrix made 4-bit blocks (llama.cpp's Q4_1 form, as
    the demo's GGUF file holds them; ``RANKONE_WEIGHTS=int4`` copies such weights to its scales'
    rounding): a model of its own, the shared fixture's weights stay as they are."""
    from service.engine.fused_llama import Int4Weight

    backbone = load_backbone(tiny_llama_dir, device=DEVICE)
    with torch.no_grad():
        for layer in backbone.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (
                *(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj),
                *(mlp.gate_proj, mlp.up_proj, mlp.down_proj),
            ):
                lin.weight.copy_(Int4Weight.of(lin.weight.cpu()).levels())
    return backbone


def make_tasks(backbone: Backbone, n: int = 4, *, seed: int = 1) -> list[ResolvedTask]:
    """``n`` tasks over two shared prompts, with random rank-1 (and one rank-2) factors."""
    g = torch.Generator().manual_seed(seed)
    shared = [torch.randn(PROMPT_LEN, backbone.dim, generator=g) for _ in range(2)]
    tasks = []
    for i in range(n):
        rank = 2 if i == 3 else 1
        tasks.append(
            ResolvedTask(
                name=f"task-{i}",
                version=1,
                shared_id=f"shared-{i % 2}",
                prompt=shared[i % 2].to(backbone.device),
                u=torch.randn(PROMPT_LEN, rank, generator=g).to(backbone.device),
                v=torch.randn(rank, backbone.dim, generator=g).to(backbone.device),
            )
        )
    return tasks


def input_ids(backbone: Backbone, text: str) -> list[int]:
    return list(backbone.tokenizer(text)["input_ids"])


def request(
    backbone: Backbone, task: ResolvedTask, text: str, rid: str = "r", **params: object
) -> GenerationRequest:
    return GenerationRequest(rid, task, input_ids(backbone, text), SamplingParams(**params))  # type: ignore[arg-type]


class Collector:
    """Collects a row's deltas (what a stream consumer would see)."""

    def __init__(self) -> None:
        self.deltas: list = []

    def __call__(self, delta) -> None:
        self.deltas.append(delta)

    @property
    def result(self) -> GenerationResult | None:
        return self.deltas[-1].result if self.deltas else None


def row(req: GenerationRequest) -> tuple[Row, Collector]:
    sink = Collector()
    return Row(request=req, emit=sink), sink


def strip_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


def reference_generate(
    backbone: Backbone, task: ResolvedTask, ids: list[int], max_new_tokens: int
) -> list[int]:
    """HF ``generate`` for the request alone (greedy), cut at EOS."""
    prompt = compose_prompt(task.prompt, task.u, task.v)[None]
    x = torch.tensor([ids], device=backbone.device)
    inputs = prepend_prompts(
        backbone.embed(x), torch.ones_like(x), prompt, causal=not backbone.is_seq2seq
    )
    with torch.inference_mode():
        out = backbone.model.generate(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )[0].tolist()
    if backbone.is_seq2seq:
        out = out[1:]  # the decoder start token
    return strip_eos(out, backbone.model.config.eos_token_id)


def reference_no_cache(
    backbone: Backbone,
    task: ResolvedTask,
    ids: list[int],
    max_new_tokens: int,
    *,
    stop_at_eos: bool = True,
) -> list[int]:
    """Ground truth: a full forward without cache over [prompt; input; tokens so far] per step."""
    prompt = compose_prompt(task.prompt, task.u, task.v)[None]
    x = torch.tensor([ids], device=backbone.device)
    inputs = prepend_prompts(
        backbone.embed(x), torch.ones_like(x), prompt, causal=not backbone.is_seq2seq
    )
    eos = backbone.model.config.eos_token_id
    tokens: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            if backbone.is_seq2seq:
                start = backbone.model.config.decoder_start_token_id
                dec = torch.tensor([[start, *tokens]], device=backbone.device)
                logits = backbone.model(
                    inputs_embeds=inputs.inputs_embeds,
                    attention_mask=inputs.attention_mask,
                    decoder_input_ids=dec,
                    use_cache=False,
                ).logits
            else:
                emb = torch.cat(
                    [
                        inputs.inputs_embeds,
                        backbone.embed(
                            torch.tensor([tokens], dtype=torch.long, device=backbone.device)
                        ),
                    ],
                    1,
                )
                logits = backbone.model(inputs_embeds=emb, use_cache=False).logits
            nxt = int(logits[0, -1].argmax())
            if nxt == eos and stop_at_eos:
                break
            tokens.append(nxt)
    return tokens
