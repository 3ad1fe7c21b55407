"""The chat rendering rule shared by trainer and server (prompts/chat.py)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from prompts import RankoneError
from prompts.chat import (
    ChatTemplateError,
    chat_input_ids,
    check_messages,
    render_chat,
    split_chat_example,
)
from tests.gguf_files import CHAT_TEMPLATE, build_tiny_tied_llama

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = build_tiny_tied_llama(tmp_path_factory.mktemp("chat-tok") / "llama")
    return AutoTokenizer.from_pretrained(path)


def test_render_ends_with_the_generation_prompt(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = render_chat(tokenizer, MESSAGES)
    assert text == "<s>system\nbe brief</s>\n<s>user\nhello</s>\n<s>assistant\n"


def test_ids_are_the_rendered_text_without_added_special_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = chat_input_ids(tokenizer, MESSAGES)
    assert ids == tokenizer(render_chat(tokenizer, MESSAGES), add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == render_chat(tokenizer, MESSAGES)
    assert ids.count(tokenizer.bos_token_id) == 3  # the template's own, none added on top


def test_no_template_and_a_template_that_refuses(tokenizer) -> None:  # type: ignore[no-untyped-def]
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        chat_input_ids(tokenizer, MESSAGES)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        chat_input_ids(tokenizer, MESSAGES)
    tokenizer.chat_template = CHAT_TEMPLATE


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], "at least one message"),
        ([{"role": "robot", "content": "x"}], "role must be one of"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "user"}], "content must be a string"),
    ],
)
def test_bad_messages(messages: list[dict[str, object]], needle: str) -> None:
    with pytest.raises(RankoneError, match=needle):
        check_messages(messages)


def test_split_chat_example() -> None:
    context, target = split_chat_example([*MESSAGES, {"role": "assistant", "content": "hi"}])
    assert context == MESSAGES and target == "hi"
    with pytest.raises(RankoneError, match="final assistant message"):
        split_chat_example(MESSAGES)
    with pytest.raises(RankoneError, match="final assistant message"):
        split_chat_example([{"role": "assistant", "content": "hi"}])
