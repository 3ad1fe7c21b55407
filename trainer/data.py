"""Text-to-text JSONL tasks: reading, few-shot sampling, tokenising, mixing across tasks.

Layout: ``<data_dir>/<task>/{train,validation,test}.jsonl``, one example per line::

    {"input": "sentiment: i loved it", "target": "positive"}

or, for chat backbones, a conversation whose last message is the assistant's reply (the target)::

    {"messages": [{"role": "user", "content": "i loved it"}, {"role": "assistant", "content": "positive"}]}

A conversation's input is rendered by the tokenizer's chat template (prompts/chat.py), the rule
``/v1/chat/completions`` uses, so a prompt trained on it serves unchanged. Extra keys are ignored. ``train.jsonl`` is required for training stages; ``validation.jsonl``
is optional (evaluation during training is skipped without it); ``test.jsonl`` is what
``evaluate`` reads by default.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prompts.chat import chat_input_ids, split_chat_example
from prompts.errors import RankoneError
from trainer.errors import TrainerError


@dataclass(frozen=True)
class Example:
    input: str
    target: str
    messages: tuple[dict[str, str], ...] | None = None  # a chat example's context; input is ""


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]  # [T_in], ends with EOS for seq2seq tokenizers that add it
    target_ids: list[int]  # [T_out], ends with EOS


def read_jsonl(path: Path) -> list[Example]:
    """Every line of ``path`` as an Example; a bad line is reported with its line number."""
    if not path.is_file():
        raise TrainerError(
            f"data file {path} does not exist (expected <data-dir>/<task>/<split>.jsonl)"
        )
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainerError(
                    f"{path}:{number}: not valid JSON ({e.msg}); expected "
                    '{"input": "...", "target": "..."}'
                ) from None
            if isinstance(record, dict) and "messages" in record:
                examples.append(_chat_example(record["messages"], f"{path}:{number}"))
                continue
            if (
                not isinstance(record, dict)
                or not isinstance(record.get("input"), str)
                or not isinstance(record.get("target"), str)
            ):
                raise TrainerError(
                    f"{path}:{number}: expected an object with string fields "
                    f'"input" and "target", got {line.strip()[:80]!r}'
                )
            examples.append(Example(record["input"], record["target"]))
    if not examples:
        raise TrainerError(f"{path}: the task has no examples (the file is empty)")
    return examples


def _chat_example(messages: Any, where: str) -> Example:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TrainerError(f'{where}: "messages" must be a list of {{"role", "content"}} objects')
    try:
        context, target = split_chat_example(messages)
    except RankoneError as e:
        raise TrainerError(f"{where}: {e}") from None
    return Example("", target, tuple(context))


def discover_tasks(data_dir: Path, tasks: list[str], split: str = "train") -> list[str]:
    """The requested tasks, or every sub-folder holding ``<split>.jsonl``; each must exist."""
    if not data_dir.is_dir():
        raise TrainerError(f"data folder {data_dir} does not exist")
    if not tasks:
        tasks = sorted(p.name for p in data_dir.iterdir() if (p / f"{split}.jsonl").is_file())
        if not tasks:
            raise TrainerError(f"no task in {data_dir}: expected <task>/{split}.jsonl sub-folders")
    for task in tasks:
        if not (data_dir / task).is_dir():
            raise TrainerError(f"task {task!r}: folder {data_dir / task} does not exist")
    return list(tasks)


def load_split(data_dir: Path, task: str, split: str, *, required: bool = True) -> list[Example]:
    path = data_dir / task / f"{split}.jsonl"
    if not required and not path.exists():
        return []
    return read_jsonl(path)


def few_shot(examples: list[Example], shots: int | None, seed: int, task: str) -> list[Example]:
    """``shots`` examples drawn without replacement, the same for a (seed, task) pair."""
    if shots is None or shots >= len(examples):
        return examples
    generator = torch.Generator().manual_seed(stable_seed(seed, "shots", task))
    order = torch.randperm(len(examples), generator=generator)[:shots]
    return [examples[i] for i in sorted(order.tolist())]


def tokenize(
    tokenizer: Any,
    examples: list[Example],
    *,
    max_input_length: int,
    max_target_length: int,
    causal: bool,
) -> list[Tokenized]:
    """Token ids of input and target, tokenised separately (as the server sees an input).

    Seq2seq: both get the tokenizer's special tokens (T5: a trailing EOS). Decoder-only: the
    input as the tokenizer encodes a prompt, the target without special tokens plus EOS, so the
    model learns to stop. Decoder-only inputs are truncated from the left (the end of a prompt
    is what the target follows). A chat example's input is its rendered conversation.
    """
    if not examples:  # e.g. a task without validation.jsonl: tokenizers refuse an empty batch
        return []
    eos = tokenizer.eos_token_id
    inputs = tokenizer([e.input for e in examples], add_special_tokens=True)["input_ids"]
    for i, example in enumerate(examples):
        if example.messages is not None:
            try:
                inputs[i] = chat_input_ids(tokenizer, example.messages)
            except RankoneError as e:
                raise TrainerError(f"chat example {i}: {e}") from None
    targets = tokenizer([e.target for e in examples], add_special_tokens=not causal)["input_ids"]
    out = []
    for ids, tgt in zip(inputs, targets, strict=True):
        if causal:
            ids = ids[-max_input_length:]
            if not tgt or tgt[-1] != eos:
                tgt = [*tgt, eos]
        else:
            ids = ids[: max_input_length - 1] + ids[-1:] if len(ids) > max_input_length else ids
        tgt = tgt[: max_target_length - 1] + tgt[-1:] if len(tgt) > max_target_length else tgt
        out.append(Tokenized(list(ids), list(tgt)))
    return out


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, the same in every process and Python run."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def task_probabilities(sizes: list[int], temperature: float) -> list[float]:
    """Examples-proportional mixing with a temperature: ``p_k ∝ n_k^(1/T)``."""
    weights = [n ** (1.0 / temperature) for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


class MixtureSampler:
    """Which (task, example) pairs make up micro-batch ``i`` on this rank.

    A pure function of (seed, rank, i): resuming needs only the micro-batch counter, and each
    rank draws from its own shard of every task (examples ``j`` with ``j % world == rank``).
    Rows are drawn independently: the task by ``task_probabilities``, then an example of it
    uniformly, with replacement.
    """

    def __init__(
        self, sizes: list[int], *, temperature: float, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        self.shards = [list(range(rank, n, world)) or list(range(n)) for n in sizes]
        self.probs = torch.tensor(task_probabilities(sizes, temperature), dtype=torch.float64)
        self.seed, self.rank = seed, rank

    def batch(self, index: int, batch_size: int) -> list[tuple[int, int]]:
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "batch", self.rank, index))
        tasks = torch.multinomial(self.probs, batch_size, replacement=True, generator=generator)
        picks = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        rows = []
        for task, pick in zip(tasks.tolist(), picks.tolist(), strict=True):
            shard = self.shards[task]
            rows.append((task, shard[int(pick * len(shard))]))
        return rows
