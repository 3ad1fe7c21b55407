"""Tiny learnable text-to-text tasks written as JSONL in the trainer's data layout."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "car", "fish"]


def _example(task: str, rng: random.Random) -> dict[str, str]:
    words = rng.sample(WORDS, 3)
    if task == "polarity":
        good = rng.random() < 0.5
        mood = rng.choice(["good", "great", "nice"] if good else ["bad", "awful", "poor"])
        return {"input": f"{words[0]} is {mood}", "target": "yes" if good else "no"}
    if task == "first":
        return {"input": " ".join(words), "target": words[0]}
    if task == "last":
        return {"input": " ".join(words), "target": words[-1]}
    raise ValueError(task)


def write_toy_tasks(
    root: Path,
    tasks: tuple[str, ...] = ("polarity", "first", "last"),
    *,
    train: int = 32,
    validation: int = 8,
    test: int = 8,
    seed: int = 0,
) -> Path:
    """``root/<task>/{train,validation,test}.jsonl`` for each toy task."""
    rng = random.Random(seed)
    for task in tasks:
        (root / task).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", train), ("validation", validation), ("test", test)):
            lines = [json.dumps(_example(task, rng)) for _ in range(n)]
            (root / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root
