"""Chat conversations as model input: the one rule the trainer and the server share.

A conversation (OpenAI-style ``[{"role": ..., "content": ...}, ...]``) is rendered by the
backbone tokenizer's chat template with the generation prompt (the assistant turn's opening),
and tokenized without adding special tokens again (the template writes them). The task's soft
prompt then goes in front of all of it, exactly as in front of a plain input (prompts/inputs.py):
``[P_k; render(messages)]``. A prompt trained on chat-formatted examples (the conversation up to
the last assistant message as input, that message as target) therefore serves unchanged through
``/v1/chat/completions``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prompts.errors import RankoneError

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatTemplateError(RankoneError):
    """The backbone has no chat template, or its template rejects the conversation."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """``messages`` as plain ``{"role", "content"}`` dicts; a bad one raises ``RankoneError``."""
    if not messages:
        raise RankoneError("a conversation needs at least one message")
    out = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RankoneError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RankoneError(f"message {i}: content must be a string")
        out.append({"role": role, "content": content})
    return out


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> str:
    """The conversation as the chat template writes it, ending with the generation prompt."""
    if not has_chat_template(tokenizer):
        raise ChatTemplateError(
            "the backbone's tokenizer has no chat template, so it cannot render chat messages; "
            "use a chat model (its tokenizer_config.json or GGUF file carries the template) "
            "or send plain text to /v1/completions"
        )
    try:
        text = tokenizer.apply_chat_template(
            check_messages(messages), add_generation_prompt=True, tokenize=False
        )
    except RankoneError:
        raise
    except Exception as e:  # jinja2 TemplateError: the template's own raise_exception(...)
        raise ChatTemplateError(f"the chat template rejects this conversation: {e}") from None
    if not isinstance(text, str):
        raise ChatTemplateError("the chat template did not render to text")
    return text


def chat_input_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Token ids [T] of the rendered conversation: the input the soft prompt goes in front of."""
    text = render_chat(tokenizer, messages)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def split_chat_example(
    messages: Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, str]], str]:
    """A training example's conversation → (the context, the last assistant reply as target)."""
    checked = check_messages(messages)
    if checked[-1]["role"] != "assistant" or len(checked) < 2:
        raise RankoneError(
            "a chat example needs at least one message before a final assistant message "
            "(its content is the target)"
        )
    return checked[:-1], checked[-1]["content"]
