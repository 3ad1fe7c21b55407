"""Text metrics of generated answers: exact match, accuracy and token F1 (SQuAD-style)."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze whitespace (SQuAD's normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, target: str) -> float:
    return float(normalize(prediction) == normalize(target))


def accuracy(prediction: str, target: str) -> float:
    """Strict: the stripped strings are equal (labels of classification tasks)."""
    return float(prediction.strip() == target.strip())


def token_f1(prediction: str, target: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(target).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def score(predictions: list[str], targets: list[str]) -> dict[str, float]:
    """Percentages over the examples: exact_match, accuracy, f1."""
    n = max(len(targets), 1)
    return {
        "exact_match": 100 * sum(map(exact_match, predictions, targets)) / n,
        "accuracy": 100 * sum(map(accuracy, predictions, targets)) / n,
        "f1": 100 * sum(map(token_f1, predictions, targets)) / n,
    }
