"""A task without prompt rows (L = 0: the base model served as a model of its own) runs through
the forward seam and the prefix cache beside prompted rows, and yields what ``generate`` yields
for its input alone, with no soft prompt."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from prompts import Backbone
from service.engine.base import GenerationRequest, ResolvedTask, SamplingParams
from service.engine.decode import DecodeLoop
from service.engine.forwards import choose_forward
from service.engine.prefix_cache import PrefixCache
from tests.engine.conftest import TEXTS, make_tasks, reference_generate, request, row


def generate_without_prompt(backbone: Backbone, ids: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate`` over the input ids alone, cut at EOS."""
    x = torch.tensor([ids], device=backbone.device)
    model: Any = backbone.model
    with torch.inference_mode():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )[0].tolist()
    out = out[1:] if backbone.is_seq2seq else out[len(ids) :]
    eos = model.config.eos_token_id
    return out[: out.index(eos)] if eos in out else out


@pytest.mark.parametrize(
    ("kind", "prefix", "fused"),
    [("t5", False, False), ("gpt2", True, False), ("llama", True, True), ("llama", False, True)],
)
def test_a_row_without_prompt_rows_in_a_mixed_batch_equals_generate(
    backbones: dict[str, Backbone], kind: str, prefix: bool, fused: bool
) -> None:
    backbone = backbones[kind]
    base = ResolvedTask.without_prompt(
        "base", backbone.dim, device=backbone.device, dtype=backbone.dtype
    )
    tasks = make_tasks(backbone)
    forward = choose_forward(backbone, fused=fused)
    assert forward.kind == ("fused" if fused else "hf")
    loop = DecodeLoop(
        backbone, prefix_cache=PrefixCache(1 << 24) if prefix else None, forward=forward
    )
    first = [
        row(request(backbone, base, TEXTS[0], "base-0", max_new_tokens=10)),
        row(request(backbone, tasks[0], TEXTS[1], "task-0", max_new_tokens=10)),
    ]
    loop.admit([r for r, _ in first])
    loop.step()
    # Later rows join: the base task again, its input starting like its latest one (the prefix
    # cache reuses those columns), beside another prompted row.
    later = [
        row(request(backbone, base, TEXTS[0] + " jumps", "base-1", max_new_tokens=8)),
        row(request(backbone, tasks[1], TEXTS[2], "task-1", max_new_tokens=8)),
    ]
    loop.admit([r for r, _ in later])
    while loop.running:
        loop.step()
    for r, sink in first + later:
        req = r.request
        assert sink.result is not None, req.request_id
        n = req.params.max_new_tokens
        if req.task is base:
            expected = generate_without_prompt(backbone, req.input_ids, n)
        else:
            expected = reference_generate(backbone, req.task, req.input_ids, n)
        assert sink.result.token_ids == expected, req.request_id
    if prefix:  # base-1 reused base-0's input columns (the prefix cache's input reuse)
        assert loop.stats.input_tokens_reused > 0


def test_a_row_without_prompt_rows_or_input_fails_alone(backbones: dict[str, Backbone]) -> None:
    backbone = backbones["gpt2"]
    base = ResolvedTask.without_prompt(
        "base", backbone.dim, device=backbone.device, dtype=backbone.dtype
    )
    errors: list[BaseException] = []
    empty, _ = row(GenerationRequest("empty", base, [], SamplingParams(max_new_tokens=4)))
    empty.fail = errors.append
    fine, sink = row(request(backbone, base, TEXTS[1], "fine", max_new_tokens=4))
    loop = DecodeLoop(backbone, prefix_cache=PrefixCache(1 << 24))
    loop.admit([empty, fine])
    while loop.running:
        loop.step()
    assert len(errors) == 1 and "needs input tokens" in str(errors[0])
    assert sink.result is not None
    assert sink.result.token_ids == generate_without_prompt(backbone, fine.request.input_ids, 4)
