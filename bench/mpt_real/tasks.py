"""A small natural-language task suite for SmolLM2, built offline and deterministically.

Six SOURCE tasks (MPT's source training) and four held-out TARGET tasks whose label sets or
formats no source has, but whose skills relate to one (sentiment → product verdicts, person
extraction → place extraction, capital of a country → country of a city, antonyms →
synonyms). Inputs carry no instruction: what the task is must come from the prompt
(``INSTRUCTIONS`` is the instruction the ``text`` baseline writes in front of the input).
Every example is a short sentence or word (≤ ~20 tokens) with a 1–3 token answer, so a
training step on the CPU stays cheap. Splits are disjoint by input; the same seed gives the
same files byte for byte.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from trainer.data import stable_seed

Example = tuple[str, str]

# --- word lists -------------------------------------------------------------------------------

_COUNTRIES = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Egypt", "Cairo"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("England", "London"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Thailand", "Bangkok"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("India", "Delhi"), ("Mexico", "Mexico City"), ("Canada", "Ottawa"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Argentina", "Buenos Aires"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
    ("Czechia", "Prague"), ("Scotland", "Edinburgh"), ("Vietnam", "Hanoi"),
    ("Philippines", "Manila"), ("Indonesia", "Jakarta"), ("Israel", "Jerusalem"),
    ("Lebanon", "Beirut"), ("Syria", "Damascus"), ("Ethiopia", "Addis Ababa"),
    ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Australia", "Canberra"),
    ("Switzerland", "Bern"),
]  # fmt: skip
_NAMES = [
    "Maria", "John", "Aisha", "Peter", "Lena", "Omar", "Sofia", "David", "Yuki", "Carlos",
    "Emma", "Ivan", "Fatima", "Lucas", "Nora", "Ahmed", "Clara", "Mateo", "Hannah", "Kofi",
    "Julia", "Ravi", "Elena", "Tom", "Grace", "Pablo", "Anna", "Samuel", "Mia", "Daniel",
]  # fmt: skip
_VERBS_PERSON = [
    "{n} bought bread", "{n} met a friend", "{n} painted the fence", "{n} cooked dinner",
    "{n} read a book", "{n} called the bank", "{n} lost a key", "{n} fixed the bike",
    "{n} wrote a letter", "{n} sold the car",
]  # fmt: skip
_WHEN = ["yesterday", "on Monday", "last week", "this morning", "in May", "at noon", "today"]
_TRAVEL = [
    "{n} flew to {c} {w}.", "{w}, {n} moved to {c}.", "{n} took a train to {c} {w}.",
    "{n} spent a week in {c}.", "{n} was born in {c}.", "The meeting with {n} is in {c} {w}.",
]  # fmt: skip
_PERSON = [
    "{w}, {v}.", "{v} {w}.", "As usual, {v}.", "{v} after work.", "Nobody knew why {v}.",
]  # fmt: skip
_MOVIES = ["The film", "This movie", "The sequel", "The plot", "The acting", "The ending"]
_POS = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "gripping"]
_NEG = ["boring", "dreadful", "dull", "awful", "clumsy", "tedious", "painful"]
_INTENS = ["", "truly ", "really ", "quite ", "simply "]
_PRODUCTS = [
    "The blender", "These shoes", "The phone", "This lamp", "The jacket", "The kettle",
    "The charger", "This backpack", "The toaster", "These headphones", "The mattress", "This tent",
]  # fmt: skip
_GOOD = [
    "works perfectly", "arrived early and works great", "is worth every penny",
    "exceeded my expectations", "is sturdy and well made", "does exactly what it promises",
    "is the best purchase I made this year", "still works like new", "is comfortable and quiet",
]  # fmt: skip
_BAD = [
    "broke after two days", "stopped working in a week", "is a waste of money",
    "arrived damaged", "feels cheap and flimsy", "never charged at all",
    "fell apart quickly", "was returned the next day", "is noisy and uncomfortable",
]  # fmt: skip
_TOPICS = {
    "sports": ["striker", "coach", "league", "marathon", "goalkeeper", "tennis final"],
    "business": ["shares", "bank", "startup", "merger", "investors", "quarterly profit"],
    "science": ["researchers", "telescope", "vaccine", "fossil", "physicists", "new species"],
    "politics": ["senate", "minister", "election", "parliament", "governor", "new law"],
}
_TOPIC_FRAMES = [
    "{x} surprises everyone", "{x} makes headlines", "Big week for the {x}",
    "What the {x} means for you", "{x} under pressure", "The {x} story continues",
]  # fmt: skip
_ANIMALS = {
    "mammal": ["dog", "cat", "whale", "horse", "bat", "mouse", "lion", "cow", "goat", "bear"],
    "bird": ["eagle", "sparrow", "owl", "parrot", "penguin", "crow", "duck", "swan", "hawk"],
    "fish": ["salmon", "trout", "shark", "tuna", "cod", "carp", "herring", "eel", "perch"],
    "insect": ["ant", "bee", "beetle", "wasp", "moth", "fly", "cricket", "flea", "locust"],
}
_ANIMAL_FRAMES = ["a {a}", "the {a}", "{a}", "one {a}", "that {a}"]
_ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("old", "new"), ("high", "low"), ("rich", "poor"), ("hard", "soft"), ("early", "late"),
    ("strong", "weak"), ("wet", "dry"), ("full", "empty"), ("open", "closed"), ("long", "short"),
    ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"), ("near", "far"), ("up", "down"),
    ("win", "lose"), ("buy", "sell"), ("true", "false"), ("safe", "dangerous"), ("young", "old"),
]  # fmt: skip
_SYNONYMS = [
    ("big", "large"), ("small", "tiny"), ("fast", "quick"), ("happy", "glad"), ("smart", "clever"),
    ("begin", "start"), ("end", "finish"), ("angry", "mad"), ("easy", "simple"), ("rich", "wealthy"),
    ("scared", "afraid"), ("shut", "close"), ("sick", "ill"), ("quiet", "silent"), ("gift", "present"),
    ("help", "assist"), ("buy", "purchase"), ("choose", "pick"), ("hard", "difficult"), ("wet", "damp"),
    ("fix", "repair"), ("correct", "right"), ("huge", "enormous"), ("story", "tale"), ("jump", "leap"),
]  # fmt: skip
# --- generators: rng → one (input, target) ------------------------------------------------------


def _sentiment(rng: random.Random, split: str) -> Example:
    good = rng.random() < 0.5
    adj = rng.choice(_POS if good else _NEG)
    return f"{rng.choice(_MOVIES)} was {rng.choice(_INTENS)}{adj}.", (
        "positive" if good else "negative"
    )


def _topic(rng: random.Random, split: str) -> Example:
    label = rng.choice(sorted(_TOPICS))
    frame = rng.choice(_TOPIC_FRAMES)
    text = frame.format(x=rng.choice(_TOPICS[label]))
    return text[0].upper() + text[1:], label


def _animal(rng: random.Random, split: str) -> Example:
    label = rng.choice(sorted(_ANIMALS))
    return rng.choice(_ANIMAL_FRAMES).format(a=rng.choice(_ANIMALS[label])), label


def _capital(rng: random.Random, split: str) -> Example:
    country, city = rng.choice(_COUNTRIES)
    return rng.choice(["{x}", "{x}.", "the country {x}", "{x}?"]).format(x=country), city


def _antonym(rng: random.Random, split: str) -> Example:
    a, b = rng.choice(_ANTONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    return rng.choice(["{x}", "{x}.", "'{x}'", "the word {x}"]).format(x=a), b


def _person(rng: random.Random, split: str) -> Example:
    name = rng.choice(_NAMES)
    verb = rng.choice(_VERBS_PERSON).format(n=name)
    text = rng.choice(_PERSON).format(v=verb, w=rng.choice(_WHEN))
    return text[0].upper() + text[1:], name


def _verdict(rng: random.Random, split: str) -> Example:
    good = rng.random() < 0.5
    text = f"{rng.choice(_PRODUCTS)} {rng.choice(_GOOD if good else _BAD)}."
    return text, "recommended" if good else "not recommended"


def _place(rng: random.Random, split: str) -> Example:
    name, (_, city) = rng.choice(_NAMES), rng.choice(_COUNTRIES)
    text = rng.choice(_TRAVEL).format(n=name, c=city, w=rng.choice(_WHEN))
    return text[0].upper() + text[1:], city


def _held_out(pool: list, split: str) -> list:
    """A fixed third of a word list per split (test, validation, train), so that test
    entities never occur in training (for the word-list targets)."""
    order = sorted(pool, key=lambda item: stable_seed("mpt_real-pool", item))
    cut_test, cut_val = round(len(order) * 0.3), round(len(order) * 0.45)
    return {"test": order[:cut_test], "validation": order[cut_test:cut_val]}.get(
        split, order[cut_val:]
    )


def _country_of(rng: random.Random, split: str) -> Example:
    country, city = rng.choice(_held_out(_COUNTRIES, split))
    return rng.choice(["{x}", "{x}.", "the city {x}", "{x}?"]).format(x=city), country


def _synonym(rng: random.Random, split: str) -> Example:
    a, b = rng.choice(_held_out(_SYNONYMS, split))
    return rng.choice(["{x}", "{x}.", "'{x}'", "the word {x}"]).format(x=a), b


# name → (generator, instruction for the ``text`` baseline, one-line documentation)
TASKS: dict[str, tuple[Callable[[random.Random, str], Example], str, str]] = {
    "sentiment": (
        _sentiment,
        "Is this movie review positive or negative?",
        "movie-review sentence → positive / negative",
    ),
    "topic": (
        _topic,
        "Is this headline about sports, business, science or politics?",
        "news headline → sports / business / science / politics",
    ),
    "animal": (
        _animal,
        "Is this animal a mammal, bird, fish or insect?",
        "animal noun phrase → mammal / bird / fish / insect",
    ),
    "capital": (
        _capital,
        "What is the capital of this country?",
        "country → its capital city (knowledge recall)",
    ),
    "antonym": (_antonym, "Give the opposite of this word.", "word → its antonym"),
    "person": (
        _person,
        "Who is the person in this sentence?",
        "sentence about one person → that person's name (extraction)",
    ),
    "verdict": (
        _verdict,
        "Would the writer of this product review say recommended or not recommended?",
        "target · product review → recommended / not recommended (relates to sentiment; new domain and labels)",
    ),
    "place": (
        _place,
        "Which city is mentioned in this sentence?",
        "target · sentence with a person and a city → the city (relates to person extraction and capital)",
    ),
    "country_of": (
        _country_of,
        "Which country is this city the capital of?",
        "target · capital city → its country (the inverse of capital)",
    ),
    "synonym": (
        _synonym,
        "Give a word with the same meaning.",
        "target · word → a synonym (relates to antonym; new relation)",
    ),
}
SOURCES = ["sentiment", "topic", "animal", "capital", "antonym", "person"]
TARGETS = ["verdict", "place", "country_of", "synonym"]


def instruction(task: str) -> str:
    return TASKS[task][1]


def generate(task: str, sizes: dict[str, int], seed: int) -> dict[str, list[Example]]:
    """Splits of ``task`` with at most ``sizes[split]`` examples, disjoint by input text.

    Test is drawn first, then validation, then train, so a larger train split never changes
    the test set. Tasks with a small input space (a word list) get fewer examples than asked.
    """
    gen = TASKS[task][0]
    rng = random.Random(stable_seed(seed, "mpt_real", task))
    seen: set[str] = set()
    out: dict[str, list[Example]] = {}
    for split in ("test", "validation", "train"):
        rows: list[Example] = []
        for _ in range(sizes[split] * 40):
            if len(rows) >= sizes[split]:
                break
            x, y = gen(rng, split)
            if x not in seen:
                seen.add(x)
                rows.append((x, y))
        out[split] = rows
    return out


def write_suite(root: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, dict[str, int]]:
    """Write ``<root>/<task>/{train,validation,test}.jsonl`` for every task; the split sizes."""
    counts: dict[str, dict[str, int]] = {}
    for task in TASKS:
        splits = generate(task, sizes, seed)
        (root / task).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            text = "".join(json.dumps({"input": x, "target": y}) + "\n" for x, y in rows)
            path = root / task / f"{split}.jsonl"
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
        counts[task] = {s: len(r) for s, r in splits.items()}
    return counts


def documentation() -> list[str]:
    """One line per task, for the results page."""
    role = {t: "source" for t in SOURCES} | {t: "target" for t in TARGETS}
    return [f"`{t}` ({role[t]}): {TASKS[t][2].removeprefix('target · ')}" for t in TASKS]
