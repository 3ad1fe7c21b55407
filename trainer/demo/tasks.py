"""Synthetic text-to-text tasks for the demo backbone and the offline benchmark.

Every task maps a short string to a short string (byte-level friendly: inputs of at most ~20
characters, targets of at most ~12). The input carries no instruction text: many tasks share
the same input distribution (a random lowercase word), so only the soft prompt can say which
function to compute — exactly what a task prompt has to carry in MPT.

- ``SOURCE_TASKS``: the task family the demo backbone is pretrained on (each behind a task
  marker token, see ``trainer.demo.pretrain``) and the MPT source mixture the demo serves.
- ``TARGET_TASKS``: held-out formats the backbone never sees in pretraining; the offline
  benchmark adapts prompts to them.
- ``GENERIC_TASKS``: the generic pretraining corpus (copying, span denoising).

Generators are deterministic given a ``random.Random``; ``write_task_data`` writes the
``<data_dir>/<task>/{train,validation,test}.jsonl`` layout the trainer reads.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LETTERS = string.ascii_lowercase
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # rankone task names
VOWELS = set("aeiou")


def random_word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def random_words(rng: random.Random, lo: int = 2, hi: int = 4) -> str:
    return " ".join(random_word(rng, 2, 4) for _ in range(rng.randint(lo, hi)))


# ---- target functions (pure, easy to test) --------------------------------------------------


def reverse(s: str) -> str:
    return s[::-1]


def upper(s: str) -> str:
    return s.upper()


def sort_letters(s: str) -> str:
    return "".join(sorted(s))


def drop_vowels(s: str) -> str:
    return "".join(c for c in s if c not in VOWELS)


def count_chars(s: str) -> str:
    return str(len(s))


def dedupe(s: str) -> str:
    seen: set[str] = set()
    out = []
    for c in s:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return "".join(out)


def first_letters(s: str) -> str:
    return "".join(w[0] for w in s.split())


def add_numbers(s: str) -> str:
    a, b = s.split("+")
    return str(int(a) + int(b))


def copy_twice(s: str) -> str:
    return s + s


def rotate_left(s: str) -> str:
    return s[1:] + s[:1]


def last_letters(s: str) -> str:
    return "".join(w[-1] for w in s.split())


def vowels_only(s: str) -> str:
    return "".join(c for c in s if c in VOWELS)


def reverse_upper(s: str) -> str:
    return s[::-1].upper()


def subtract_numbers(s: str) -> str:
    a, b = s.split("-")
    return str(int(a) - int(b))


def sort_desc(s: str) -> str:
    return "".join(sorted(s, reverse=True))


def count_vowels(s: str) -> str:
    return str(sum(c in VOWELS for c in s))


def count_consonants(s: str) -> str:
    return str(sum(c not in VOWELS for c in s))


def min_letter(s: str) -> str:
    return min(s)


def max_letter(s: str) -> str:
    return max(s)


def sort_unique(s: str) -> str:
    return "".join(sorted(set(s)))


def vowels_sorted(s: str) -> str:
    return "".join(sorted(c for c in s if c in VOWELS))


def second_letter(s: str) -> str:
    return sorted(s)[1]


def min_max(s: str) -> str:
    return min(s) + max(s)


def identity(s: str) -> str:
    return s


# ---- input samplers --------------------------------------------------------------------------


def _word(rng: random.Random) -> str:
    return random_word(rng, 3, 7)


def _letters(rng: random.Random) -> str:
    """3-7 distinct letters: a bag-of-letters input (no repeated letter to keep apart)."""
    return "".join(rng.sample(LETTERS, rng.randint(3, 7)))


def _letters_with_vowel(rng: random.Random) -> str:
    word = rng.sample(LETTERS, rng.randint(3, 7))
    if not VOWELS & set(word):
        word[rng.randrange(len(word))] = rng.choice(sorted(VOWELS - set(word)))
    return "".join(word)


def _short_word(rng: random.Random) -> str:
    return random_word(rng, 2, 6)


def _words(rng: random.Random) -> str:
    return random_words(rng, 2, 4)


def _sum(rng: random.Random) -> str:
    return f"{rng.randint(0, 49)}+{rng.randint(0, 49)}"


def _difference(rng: random.Random) -> str:
    a = rng.randint(0, 99)
    return f"{a}-{rng.randint(0, a)}"


def _text(rng: random.Random) -> str:
    return random_words(rng, 1, 4)


@dataclass(frozen=True)
class Task:
    """A synthetic task: a name, an input sampler and the function computing the target."""

    name: str
    sample_input: Callable[[random.Random], str]
    fn: Callable[[str], str]
    description: str

    def example(self, rng: random.Random) -> dict[str, str]:
        x = self.sample_input(rng)
        return {"input": x, "target": self.fn(x)}


# The demo family is "bag of letters" tasks on words of distinct letters: their output depends
# on which letters a word holds, not on where (repeated letters would need positions too), so a small T5 pretrained from scratch for a few CPU minutes learns them
# to >= 90% exact match (order-dependent tasks such as reversing need far more steps: the
# encoder must first learn to encode absolute positions; see EXTRA_TASKS).
SOURCE_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("sort", _letters, sort_letters, "sort the letters: house -> ehosu"),
        Task("sort-desc", _letters, sort_desc, "sort the letters, descending: house -> usohe"),
        Task("count", _letters, count_chars, "count the letters: house -> 5"),
        Task("count-vowels", _letters, count_vowels, "count the vowels: house -> 3"),
        Task("min-letter", _letters, min_letter, "alphabetically first letter: house -> e"),
        Task("max-letter", _letters, max_letter, "alphabetically last letter: house -> u"),
    ]
}

# Held-out formats for the offline benchmark: never seen in pretraining. The first four are
# new functions of the same letter bag; the last two are order-dependent (hard).
TARGET_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("count-consonants", _letters, count_consonants, "count the consonants: house -> 2"),
        Task("second-letter", _letters, second_letter, "second letter alphabetically: house -> h"),
        Task(
            "vowels-sorted", _letters_with_vowel, vowels_sorted, "the vowels, sorted: house -> eou"
        ),
        Task("min-max", _letters, min_max, "first and last letter alphabetically: house -> eu"),
        Task("reverse", _letters, reverse, "reverse a word: abcd -> dcba"),
        Task("upper", _letters, upper, "uppercase a word: abcd -> ABCD"),
    ]
}

# Defined and tested, but in neither family: order-dependent tasks that a backbone
# pretrained for minutes on two CPU cores does not learn. Useful with bigger budgets.
EXTRA_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("no-vowels", _word, drop_vowels, "drop the vowels: house -> hs"),
        Task("initials", _words, first_letters, "first letter of each word: ab cd -> ac"),
        Task("sort-unique", _word, sort_unique, "sorted distinct letters: hello -> ehlo"),
        Task("dedupe", _word, dedupe, "drop repeated letters: hello -> helo"),
        Task("add", _sum, add_numbers, "add two numbers: 12+7 -> 19"),
        Task("copy-twice", _short_word, copy_twice, "write the word twice: abc -> abcabc"),
        Task("rotate", _word, rotate_left, "rotate left by one: abcd -> bcda"),
        Task("finals", _words, last_letters, "last letter of each word: ab cd -> bd"),
        Task("vowels", _word, vowels_only, "keep only the vowels: house -> oue"),
        Task("reverse-upper", _word, reverse_upper, "reverse and uppercase: abc -> CBA"),
        Task("subtract", _difference, subtract_numbers, "subtract: 19-7 -> 12"),
    ]
}

GENERIC_TASKS: dict[str, Task] = {
    t.name: t for t in [Task("copy", _text, identity, "copy the input")]
}

ALL_TASKS: dict[str, Task] = {**SOURCE_TASKS, **TARGET_TASKS, **GENERIC_TASKS, **EXTRA_TASKS}


def get_task(name: str) -> Task:
    try:
        return ALL_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown demo task {name!r}; known: {sorted(ALL_TASKS)}") from None


def task_seed(seed: int, name: str) -> int:
    """A per-task seed that does not depend on Python's salted ``hash``."""
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(name))


def generate_examples(task: Task | str, n: int, seed: int) -> list[dict[str, str]]:
    task = get_task(task) if isinstance(task, str) else task
    rng = random.Random(task_seed(seed, task.name))
    return [task.example(rng) for _ in range(n)]


def generate_splits(
    task: Task | str, n_train: int, n_val: int, n_test: int, seed: int
) -> dict[str, list[dict[str, str]]]:
    """Disjoint train / validation / test splits (by input) of one task.

    Inputs are drawn without replacement until the splits are full (or the input space runs
    dry, in which case later splits may be shorter — never the case at the demo sizes).
    """
    task = get_task(task) if isinstance(task, str) else task
    rng = random.Random(task_seed(seed, task.name))
    wanted = n_train + n_val + n_test
    seen: set[str] = set()
    examples: list[dict[str, str]] = []
    tries = 0
    while len(examples) < wanted and tries < 50 * wanted + 100:
        tries += 1
        ex = task.example(rng)
        if ex["input"] in seen:
            continue
        seen.add(ex["input"])
        examples.append(ex)
    return {
        "train": examples[:n_train],
        "validation": examples[n_train : n_train + n_val],
        "test": examples[n_train + n_val : wanted],
    }


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_task_data(
    out_dir: str | Path,
    tasks: Iterable[str | Task],
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
) -> dict[str, dict[str, int]]:
    """Write ``<out_dir>/<task>/{train,validation,test}.jsonl``; return the split sizes."""
    out = Path(out_dir)
    sizes: dict[str, dict[str, int]] = {}
    for task in tasks:
        task = get_task(task) if isinstance(task, str) else task
        splits = generate_splits(task, n_train, n_val, n_test, seed)
        for split, rows in splits.items():
            write_jsonl(out / task.name / f"{split}.jsonl", rows)
        sizes[task.name] = {split: len(rows) for split, rows in splits.items()}
    return sizes


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
