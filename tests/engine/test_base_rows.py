"""Rows with no prompt rows (L = 0: the base model) decode exactly like HF ``generate`` on the
input alone, in the same batches as tasks, with and without the prefix cache."""

from __future__ import annotations

import pytest
import torch

from prompts import Backbone
from service.engine.base import ResolvedTask
from service.engine.decode import DecodeLoop
from service.engine.prefix_cache import PrefixCache
from tests.engine.conftest import TEXTS, make_tasks, request, row, strip_eos


def base_task(backbone: Backbone) -> ResolvedTask:
    d = backbone.dim
    return ResolvedTask("base", 0, "", torch.zeros(0, d), torch.zeros(0, 1), torch.zeros(1, d))


def plain_generate(backbone: Backbone, ids: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate`` on the token ids, no soft prompt at all."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = backbone.model.generate(  # type: ignore[operator]
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )[0].tolist()
    out = out[1:] if backbone.is_seq2seq else out[len(ids) :]
    return strip_eos(out, backbone.model.config.eos_token_id)


@pytest.mark.parametrize(
    ("kind", "prefix"),
    [("t5", False), ("gpt2", False), ("gpt2", True), ("llama", False), ("llama", True)],
)
def test_base_rows_beside_task_rows_equal_plain_generate(
    backbones: dict[str, Backbone], kind: str, prefix: bool
) -> None:
    bb = backbones[kind]
    base, task = base_task(bb), make_tasks(bb)[0]
    loop = DecodeLoop(bb, prefix_cache=PrefixCache(1 << 24) if prefix else None)
    first = [
        row(request(bb, base, TEXTS[0], "a", max_new_tokens=8)),
        row(request(bb, task, TEXTS[1], "b", max_new_tokens=8)),
        row(request(bb, base, TEXTS[2], "c", max_new_tokens=6)),
    ]
    loop.admit([r for r, _ in first])
    loop.step()
    # joins mid-flight; its input starts like row "a"'s (the cached path reuses those columns)
    late = row(request(bb, base, TEXTS[0] + " jumps", "d", max_new_tokens=7))
    loop.admit([late[0]])
    while loop.running:
        loop.step()
    for r, sink in [*first, late]:
        req = r.request
        assert sink.result is not None
        if req.task is base:
            expected = plain_generate(bb, req.input_ids, req.params.max_new_tokens)
            assert sink.result.token_ids == expected, req.request_id


def test_base_row_with_no_input_fails_alone(backbones: dict[str, Backbone]) -> None:
    bb = backbones["llama"]
    loop = DecodeLoop(bb, prefix_cache=PrefixCache(1 << 24))
    empty = request(bb, base_task(bb), "", "e", max_new_tokens=4)
    empty.input_ids = []
    failed: list[BaseException] = []
    bad, _ = row(empty)
    bad.fail = failed.append
    good, sink = row(request(bb, make_tasks(bb)[0], TEXTS[0], "g", max_new_tokens=4))
    loop.admit([bad])
    loop.admit([good])
    while loop.running:
        loop.step()
    assert failed and "needs input tokens" in str(failed[0])
    assert sink.result is not None and sink.result.token_ids
