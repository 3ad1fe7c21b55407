"""Prompt tuning's text init (Lester et al. 2021): a prompt starts as the embeddings of a text.

The L rows of a fresh prompt are the backbone's input embeddings of the tokenised instruction
(``"Classify the sentiment of the review as positive or negative."``), repeated when it has
fewer than L tokens and truncated when it has more. The task then works roughly as well as
the instruction written in front of the input before any training, and needs few steps.

Where a task's init text comes from, most explicit first:

1. ``--init-text TEXT``: one text for every task of the run;
2. ``--init-texts FILE``: a JSON or YAML mapping ``{task: text}`` (tasks it does not name
   fall through to 3; names of tasks not in the run are ignored, so one file can serve
   several runs);
3. ``<data-dir>/<task>/instruction.txt``: the task's own instruction, kept with its data.

``--init auto`` (the default) uses the text init for every task that has a text and the
vocabulary init for the others; ``--init text`` requires a text for every task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prompts import Backbone
from trainer.errors import TrainerError

INSTRUCTION_FILE = "instruction.txt"


def text_init_rows(backbone: Backbone, text: str, length: int) -> Tensor:
    """Input embeddings of ``text``'s tokens, cycled or cut to ``length`` rows → [L, d] fp32."""
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TrainerError(f"init text {text!r} has no tokens; give some words")
    model: Any = backbone.model
    table = model.get_input_embeddings().weight.detach()  # [V, d]
    index = torch.tensor(ids).repeat(length // len(ids) + 1)[:length]  # [L]
    return table[index.to(table.device)].float().cpu().clone()


def read_init_texts(path: Path) -> dict[str, str]:
    """A ``{task: text}`` mapping from a JSON or YAML file, each value a non-empty string."""
    if not path.is_file():
        raise TrainerError(f"--init-texts file {path} does not exist")
    try:
        if path.suffix in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except Exception as e:  # yaml and json raise several unrelated types
        raise TrainerError(f"--init-texts file {path} is not valid JSON or YAML: {e}") from None
    if not isinstance(data, dict):
        raise TrainerError(
            f'--init-texts file {path} must hold a mapping {{"task": "instruction"}}, '
            f"got {type(data).__name__}"
        )
    for task, text in data.items():
        if not isinstance(text, str) or not text.strip():
            raise TrainerError(
                f"--init-texts file {path}: task {task!r} needs a non-empty string, got {text!r}"
            )
    return {str(k): v.strip() for k, v in data.items()}


def read_instruction(data_dir: Path, task: str) -> str | None:
    """``<data-dir>/<task>/instruction.txt`` stripped, or None when there is none."""
    path = data_dir / task / INSTRUCTION_FILE
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise TrainerError(f"{path} is empty; write the task's instruction in it or delete it")
    return text


def resolve_init_texts(
    tasks: list[str],
    *,
    text: str | None,
    mapping_file: Path | None,
    data_dir: Path | None,
) -> dict[str, str | None]:
    """Each task's init text by the precedence in the module docstring (None: no text)."""
    mapping = read_init_texts(mapping_file) if mapping_file is not None else {}
    out: dict[str, str | None] = {}
    for task in tasks:
        if text:
            out[task] = text
        elif task in mapping:
            out[task] = mapping[task]
        else:
            out[task] = read_instruction(data_dir, task) if data_dir is not None else None
    return out


def init_kinds(init: str, texts: dict[str, str | None]) -> dict[str, str]:
    """The init each task gets: ``auto`` → text where a text exists, else vocab."""
    missing = [t for t, s in texts.items() if s is None]
    if init == "text" and missing:
        raise TrainerError(
            f"--init text: no init text for task(s) {', '.join(missing)}; give --init-text, "
            f"--init-texts FILE or write <data-dir>/<task>/{INSTRUCTION_FILE}"
        )
    if init != "auto":
        return dict.fromkeys(texts, init)
    return {t: "text" if s is not None else "vocab" for t, s in texts.items()}
