"""The methods ``bench/demo_accuracy.py`` compares, as tasks a rankone server can serve.

Written text becomes a *hard* prompt: a shared prompt whose rows are the backbone's input
embeddings of the text's tokens, with identity factors (``u = 1``, ``v = 1``). Prepended to
the input embeddings it is exactly the text typed in front of the input, provided the tokens
split at the seam as they would in one string (``split_mismatches`` counts where they do not).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from prompts import Backbone, SharedPrompt, encode_shared, identity_factors

SEAM = "<<<INPUT>>>"  # marks where the input goes in the rendered chat template


@dataclass
class Method:
    """How one method asks one task: the served task name, and text around each input."""

    task: str
    suffix: str = ""  # appended to every input (the chat template's closing turn)
    hard_prompt: str | None = None  # text registered as a hard prompt under ``task``
    shared_blob: str | None = None  # base64 safetensors of the teacher's shared prompt
    factors: dict[str, Any] = field(default_factory=dict)
    chat: bool = False  # ask through POST /v1/chat/completions (the input as the user turn)


def hard_prompt_rows(backbone: Backbone, text: str) -> torch.Tensor:
    """Input embeddings of ``text``'s tokens (no special tokens added) → [T, d] fp32."""
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    model: Any = backbone.model
    table = model.get_input_embeddings().weight.detach()
    return table[torch.tensor(ids)].float().cpu().clone()


def chat_frame(backbone: Backbone, instruction: str) -> tuple[str, str] | None:
    """(text before the input, text after it) of the chat template with the user message
    ``"<instruction>\\n<input>"``; None when the tokenizer has no chat template."""
    tok = backbone.tokenizer
    if not getattr(tok, "chat_template", None):
        return None
    messages = [{"role": "user", "content": f"{instruction}\n{SEAM}"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    before, after = rendered.split(SEAM)
    return before, after


def split_mismatches(backbone: Backbone, prefix: str, inputs: list[str], suffix: str) -> int:
    """Inputs whose tokens differ between ``prefix + input + suffix`` as one string and the
    prefix's tokens followed by ``input + suffix``'s (what the hard prompt serves)."""
    tok = backbone.tokenizer
    head = tok(prefix, add_special_tokens=False)["input_ids"]
    bad = 0
    for x in inputs:
        whole = tok(prefix + x + suffix)["input_ids"]
        if whole != head + tok(x + suffix)["input_ids"]:
            bad += 1
    return bad


def shared_blob(backbone: Backbone, shared_id: str, rows: torch.Tensor) -> str:
    sp = SharedPrompt(id=shared_id, prompt=rows, backbone=backbone.fingerprint)
    return base64.b64encode(encode_shared(sp)).decode()


def identity_body(name: str, shared_id: str, length: int, dim: int) -> dict[str, Any]:
    u, v = identity_factors(length, dim)  # [L, 1], [1, d]
    return {"name": name, "shared": shared_id, "u": u.tolist(), "v": v.tolist()}


def _words(text: str) -> str:
    return " " + re.sub(r"[^\w'-]+", " ", text.lower()).strip() + " "


def contains(output: str, target: str, labels: tuple[str, ...]) -> bool:
    """The target occurs in the output as whole words; for a label set, no other label does."""
    got = _words(output)
    if _words(target) not in got:
        return False
    return not any(_words(lab) in got for lab in labels if lab.lower() != target.lower())
