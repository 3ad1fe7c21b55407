"""Pure sampling filters, incremental detokenization and stop strings."""

from __future__ import annotations

import pytest
import torch

from prompts import Backbone
from service.engine.base import SamplingParams
from service.engine.detok import IncrementalDetokenizer, find_stop, stable_end
from service.engine.sampling import (
    apply_repetition_penalty,
    choose_tokens,
    filter_top_k_top_p,
    make_generator,
)


@pytest.mark.parametrize(
    ("top_k", "top_p", "survivors"),
    [
        (0, 1.0, [0, 1, 2, 3]),
        (1, 1.0, [3]),
        (2, 1.0, [2, 3]),
        (0, 0.5, [3]),
        (0, 0.7, [2, 3]),
        (3, 0.01, [3]),
    ],
)
def test_filter_top_k_top_p(top_k: int, top_p: float, survivors: list[int]) -> None:
    logits = torch.log(torch.tensor([0.1, 0.1, 0.3, 0.5]))
    out = filter_top_k_top_p(logits, top_k, top_p)
    assert torch.isfinite(out).nonzero().flatten().tolist() == survivors


@pytest.mark.parametrize(("seen", "expected"), [([], [2.0, -2.0, 1.0]), ([0, 1], [1.0, -4.0, 1.0])])
def test_repetition_penalty(seen: list[int], expected: list[float]) -> None:
    out = apply_repetition_penalty(
        torch.tensor([2.0, -2.0, 1.0]), torch.tensor(seen, dtype=torch.long), 2.0
    )
    assert out.tolist() == expected


def test_choose_tokens_empty_batch_and_greedy() -> None:
    assert choose_tokens(torch.zeros(0, 5), [], [], []) == []
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert choose_tokens(
        logits, [SamplingParams()] * 2, [torch.zeros(0, dtype=torch.long)] * 2, [None, None]
    ) == [1, 0]


def test_seeded_sampling_is_independent_of_neighbours() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=7)
    empty = torch.zeros(0, dtype=torch.long)
    fallback = torch.Generator().manual_seed(0)

    def draw(rows: list[int]) -> list[int]:
        gens = [make_generator(7 if r == 0 else None, torch.device("cpu"), fallback) for r in rows]
        out = []
        for _ in range(5):
            out.append(
                choose_tokens(logits[rows], [params] * len(rows), [empty] * len(rows), gens)[0]
            )
        return out

    assert draw([0]) == draw([0, 1, 2]) == draw([0, 2])


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [("", ["x"], None), ("hello world", ["wor"], 6), ("abc", ["c", "b"], 1), ("abc", [""], None)],
)
def test_find_stop(text: str, stops: list[str], expected: int | None) -> None:
    assert find_stop(text, stops) == expected


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        ("", [], 0),
        ("abc", [], 3),
        ("abc\ufffd", [], 3),
        ("hello wo", ["world"], 6),
        ("hello", ["lo!", "xyz"], 3),
        ("ab", ["abc"], 0),
    ],
)
def test_stable_end(text: str, stops: list[str], expected: int) -> None:
    assert stable_end(text, stops) == expected


class CharTokenizer:
    """Token i decodes to chr(i); 0 is special; 1000 then 1001 are the two halves of "é"."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out = ""
        for j, i in enumerate(ids):
            if i == 1000:
                out += "é" if ids[j + 1 : j + 2] == [1001] else "\ufffd"
            elif i != 0 and i != 1001:
                out += chr(i)
        return out


def test_detokenizer_holds_back_partial_chars_and_stops() -> None:
    detok = IncrementalDetokenizer(CharTokenizer(), stops=["XY"])
    deltas = [
        detok.add(t)
        for t in [ord("a"), 1000, 1001, ord("X"), ord("b"), ord("X"), ord("Y"), ord("c")]
    ]
    assert deltas[:3] == ["a", "", "é"]
    assert deltas[3] == ""  # "X" may start the stop string
    assert deltas[4] == "Xb"
    assert deltas[6] == "" and detok.stopped
    assert detok.text == "aéXb"
    assert "".join(deltas[:7]) + detok.flush() == detok.text


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_detokenizer_text_is_the_whole_decode_at_every_token(
    backbones: dict[str, Backbone], name: str
) -> None:
    """Decoding only the ids since the last whole character (in context) gives, after every
    token, the text of decoding every id: random ids, byte pieces of multi-byte characters and
    special tokens among them; the deltas add up to it."""
    tokenizer = backbones[name].tokenizer
    g = torch.Generator().manual_seed(7)
    vocab = len(tokenizer)
    special = sorted(tokenizer.all_special_ids)
    pieces = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in MULTIBYTE]
    for trial in range(12):
        ids: list[int] = []
        while len(ids) < 60:
            pick = int(torch.randint(0, 10, (1,), generator=g))
            if pick < 2 and special:
                ids.append(special[int(torch.randint(0, len(special), (1,), generator=g))])
            elif pick < 5:
                ids += pieces[int(torch.randint(0, len(pieces), (1,), generator=g))]
            else:
                ids.append(int(torch.randint(0, vocab, (1,), generator=g)))
        for special_ids in (None, frozenset(special)):
            detok = IncrementalDetokenizer(tokenizer, special_ids=special_ids)
            deltas = []
            for k, token in enumerate(ids, 1):
                deltas.append(detok.add(token))
                kept = ids[:k] if special_ids is None else [i for i in ids[:k] if i not in special]
                whole = tokenizer.decode(kept, skip_special_tokens=special_ids is None)
                assert detok.text == whole, (name, trial, k)
            assert "".join(deltas) + detok.flush() == detok.text


MULTIBYTE = ["é", "naïve café", "日本語のテキスト", "emoji 🙂 ok", "Ωμέγα", " ü", "ß ẞ"]


def test_detokenizer_decodes_new_ids_in_context() -> None:
    """A SentencePiece-style decoder (Llama's: ``▁`` as a space, byte pieces, the first space
    stripped) renders a token's leading space only after another token, and a character's byte
    pieces only together: the text after every token is still the whole decode's."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "▁hello", "▁world", "▁caf", "▁", "!", "<0xC3>", "<0xA9>", "<0xF0>"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tokenizer.clean_up_tokenization_spaces = False
    g = torch.Generator().manual_seed(3)
    for trial in range(40):
        ids = [int(i) for i in torch.randint(1, len(words), (12,), generator=g)]
        ids[:4] = [1, 3, 6, 7][: 1 + trial % 4]  # "hello café", cut at each of its pieces
        detok = IncrementalDetokenizer(tokenizer)
        deltas = []
        for k, token in enumerate(ids, 1):
            deltas.append(detok.add(token))
            assert detok.text == tokenizer.decode(ids[:k], skip_special_tokens=True), (ids, k)
        if 8 not in ids:  # a lone lead byte rewrites the character before it too ("é" → "��")
            assert "".join(deltas) + detok.flush() == detok.text
    assert tokenizer.decode([1, 2]) == "hello world" and tokenizer.decode([2]) == "world"
    assert tokenizer.decode([3, 6, 7]) == "café" and tokenizer.decode([3, 6, 7, 8]) == "caf���"
    ids = [1, 3, 6, 7, 6, 7, 6, 7, 8]  # three committed "é", then a lone lead byte
    detok = IncrementalDetokenizer(tokenizer)
    for token in ids:
        detok.add(token)
    assert detok.text == tokenizer.decode(ids) == "hello caf" + "\ufffd" * 7
