"""The real-model demo's natural-language tasks: offline, deterministic, with held-out tests.

Each task maps a short English (or, for ``language``, European) sentence to a short answer,
and the input carries no instruction: the sentence alone does not say whether to name its
sentiment, its topic or its city. The task lives in the soft prompt only. Each task also has
an ``instruction``: the text its teacher prompt is initialised from (``trainer.init_text``)
and the prompt-engineering baseline of ``bench/demo_accuracy.py``; and ``accepts``: what
inputs it was trained for (docs/demo.md's table is generated from these).

Held-out tests: the content lists of ``nl_words`` are split by position (``split_pool``:
every fourth entry goes to test only), so test inputs use cities, review adjectives and
subjects, headline subjects, antonym pairs, casual-sentence templates and foreign sentences
that no training row contains (the carrier templates are shared).

``write_nl_task_data`` writes the trainer's layout,
``<dir>/<task>/{train,validation,test}.jsonl`` plus ``instruction.txt``, each row in chat
format (``as_chat``): the input alone as the user turn, with no system message (so the chat
template adds its default system prompt, as it does for a client that sends only a user turn),
and the target as the assistant turn. The trainer renders it with the chat template
(prompts/chat.py), the rule ``/v1/chat/completions`` serves, and learns the end-of-turn token
after the answer, so the served prompt answers in the chat format SmolLM2-Instruct was tuned on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from trainer.demo import nl_words as W
from trainer.demo.tasks import task_seed, write_jsonl

T = TypeVar("T")
Pools = tuple[Any, ...]  # the word lists one generator draws from, each already split


def split_pool(items: Sequence[T], part: str, every: int = 4) -> list[T]:
    """``part`` "test": every ``every``-th entry (from index ``every - 1``); "train": the rest."""
    held = [x for i, x in enumerate(items) if i % every == every - 1]
    kept = [x for i, x in enumerate(items) if i % every != every - 1]
    return held if part == "test" else kept


def formal(sentence: str) -> str:
    """The formal rewrite: every ``FORMAL_SWAPS`` word replaced, first letter capitalised."""
    for informal, formal_ in W.FORMAL_SWAPS:
        sentence = re.sub(rf"(?<![\w']){re.escape(informal)}(?![\w'])", formal_, sentence)
    return sentence[:1].upper() + sentence[1:]


def _sentiment(rng: random.Random, part: str) -> dict[str, str]:
    label = rng.choice(["positive", "negative"])
    words = W.POSITIVE_WORDS if label == "positive" else W.NEGATIVE_WORDS
    text = rng.choice(W.SENTIMENT_TEMPLATES).format(
        subject=rng.choice(split_pool(W.SENTIMENT_SUBJECTS, part)),
        word=rng.choice(split_pool(words, part)),
    )
    return {"input": text[:1].upper() + text[1:], "target": label}


def _topic(rng: random.Random, part: str) -> dict[str, str]:
    label = rng.choice(sorted(W.TOPIC_WORDS))
    thing = rng.choice(split_pool(W.TOPIC_WORDS[label], part))
    text = rng.choice(W.TOPIC_TEMPLATES).format(thing=thing)
    return {"input": text[:1].upper() + text[1:], "target": label}


def _city(rng: random.Random, part: str) -> dict[str, str]:
    city = rng.choice(split_pool(W.CITIES, part))
    text = rng.choice(W.CITY_TEMPLATES).format(city=city)
    return {"input": text[:1].upper() + text[1:], "target": city}


def _antonym(rng: random.Random, part: str) -> dict[str, str]:
    a, b = rng.choice(split_pool(W.ANTONYMS, part))
    return {"input": a, "target": b} if rng.random() < 0.5 else {"input": b, "target": a}


def _formal(rng: random.Random, part: str) -> dict[str, str]:
    template = rng.choice(split_pool(W.FORMAL_TEMPLATES, part))
    text = template.format(obj=rng.choice(W.FORMAL_OBJECTS))
    return {"input": text, "target": formal(text)}


def _language(rng: random.Random, part: str) -> dict[str, str]:
    label = rng.choice(sorted(W.LANGUAGE_SENTENCES))
    text = rng.choice(split_pool(W.LANGUAGE_SENTENCES[label], part))
    text = text[:1].upper() + text[1:] + rng.choice([".", "!", "?", ""])
    return {"input": text, "target": label}


@dataclass(frozen=True)
class NLTask:
    name: str
    instruction: str  # what the teacher's text init and the prompt-engineering baseline say
    accepts: str  # the inputs it was trained on, for docs/demo.md and `rankone demo`
    labels: tuple[str, ...]  # the closed answer set of a classification task, else ()
    make: Callable[[random.Random, str], dict[str, str]]


NL_TASKS: dict[str, NLTask] = {
    t.name: t
    for t in [
        NLTask(
            "sentiment",
            "Is the sentiment of this review positive or negative? Answer with one word.",
            "a one-sentence review of a product, place or show; answers positive or negative",
            ("positive", "negative"),
            _sentiment,
        ),
        NLTask(
            "topic",
            "What is the topic of this headline: sports, business, science or politics?",
            "a short news headline; answers sports, business, science or politics",
            tuple(sorted(W.TOPIC_WORDS)),
            _topic,
        ),
        NLTask(
            "city",
            "Which city is named in this sentence? Answer with the city only.",
            "an English sentence naming one city (capitalised); answers the city",
            (),
            _city,
        ),
        NLTask(
            "antonym",
            "Give the opposite of this word. Answer with one word.",
            "one common English adjective, verb, noun or adverb in lower case; answers its antonym",
            (),
            _antonym,
        ),
        NLTask(
            "formal",
            "Rewrite this sentence formally, without contractions or slang.",
            "a short casual sentence with contractions (can't, we're, ...) or slang (gonna, "
            "wanna, kids, stuff); answers it without them, capitalised",
            (),
            _formal,
        ),
        NLTask(
            "language",
            "Which language is this sentence written in? Answer with the language name.",
            "a short everyday sentence in English, French, Spanish, German or Italian; "
            "answers the language's English name",
            tuple(sorted(W.LANGUAGE_SENTENCES)),
            _language,
        ),
    ]
}


def generate_split(task: NLTask, n: int, seed: int, split: str) -> list[dict[str, str]]:
    """``n`` examples of one split; test draws from the held-out pools only. Test and
    validation avoid repeating an input while distinct ones remain (within 20·n draws)."""
    rng = random.Random(task_seed(seed, f"{task.name}/{split}"))
    part = "test" if split == "test" else "train"
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(20 * n):
        if len(rows) == n:
            break
        row = task.make(rng, part)
        if split != "train" and row["input"] in seen:
            continue
        seen.add(row["input"])
        rows.append(row)
    while len(rows) < n:  # the held-out pool is smaller than n: repeats are unavoidable
        rows.append(task.make(rng, part))
    return rows


def as_chat(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """``{"input", "target"}`` → the chat example the trainer reads (user turn → assistant)."""
    return {
        "messages": [
            {"role": "user", "content": row["input"]},
            {"role": "assistant", "content": row["target"]},
        ]
    }


def chat_row(record: dict[str, Any]) -> dict[str, str]:
    """A written chat example back as ``{"input", "target"}`` (the last user / assistant turn)."""
    if "messages" not in record:
        return {"input": record["input"], "target": record["target"]}
    messages = record["messages"]
    user = [m["content"] for m in messages if m["role"] == "user"]
    return {"input": user[-1], "target": messages[-1]["content"]}


def write_nl_task_data(
    root: Path, tasks: list[str], n_train: int, n_val: int, n_test: int, *, seed: int = 0
) -> dict[str, dict[str, int]]:
    """Write every task's splits and its ``instruction.txt``; returns the split sizes."""
    sizes: dict[str, dict[str, int]] = {}
    for name in tasks:
        task = NL_TASKS[name]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "instruction.txt").write_text(task.instruction + "\n", encoding="utf-8")
        sizes[name] = {}
        for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
            rows = [as_chat(r) for r in generate_split(task, n, seed, split)]
            write_jsonl(folder / f"{split}.jsonl", rows)
            sizes[name][split] = n
    return sizes
