"""The demo benchmark's methods: a hard prompt is the typed text, the chat frame, the scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import demo_methods as M
from prompts import load_backbone
from trainer.generate import greedy


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path):
    return load_backbone(str(tiny_llama_dir), device="cpu")


@pytest.mark.parametrize(
    ("output", "target", "labels", "hit"),
    [
        ("positive", "positive", ("positive", "negative"), True),
        ("The sentiment is positive.", "positive", ("positive", "negative"), True),
        ("positive or negative", "positive", ("positive", "negative"), False),
        ("positively", "positive", ("positive", "negative"), False),
        ("I think it is Paris!", "Paris", (), True),
        ("We are going to purchase it.", "We are going to purchase it.", (), True),
        ("", "cold", (), False),
    ],
)
def test_contains(output: str, target: str, labels: tuple[str, ...], hit: bool) -> None:
    assert M.contains(output, target, labels) is hit


def test_hard_prompt_generates_what_the_typed_text_does(llama) -> None:
    tok = llama.tokenizer
    text, inputs = "the red cat\n", ["a dog", "the sun is up", "blue"]
    assert M.split_mismatches(llama, text, inputs, "") == 0
    rows = M.hard_prompt_rows(llama, text)  # [T, d]
    assert rows.shape == (len(tok(text, add_special_tokens=False)["input_ids"]), llama.dim)
    served = greedy(llama, rows[None].expand(3, -1, -1), [tok(x)["input_ids"] for x in inputs], 6)
    typed = greedy(llama, None, [tok(text + x)["input_ids"] for x in inputs], 6)
    assert served == typed


def test_chat_frame_splits_the_rendered_template_around_the_input(llama) -> None:
    assert M.chat_frame(llama, "say it") is None  # the tiny tokenizer has no template
    llama.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    try:
        before, after = M.chat_frame(llama, "say it")  # type: ignore[misc]
    finally:
        llama.tokenizer.chat_template = None
    assert (before, after) == ("<user>say it\n", "</s><assistant>")


def test_identity_body_is_u_v_of_ones() -> None:
    body = M.identity_body("t", "s", 3, 4)
    assert torch.tensor(body["u"]).shape == (3, 1) and torch.tensor(body["v"]).shape == (1, 4)
    assert torch.equal(torch.tensor(body["u"]) @ torch.tensor(body["v"]), torch.ones(3, 4))
