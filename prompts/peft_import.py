"""Import Hugging Face PEFT prompt adapters into rankone artifacts.

- ``MULTITASK_PROMPT_TUNING`` (``prompt_embeddings`` [L, d], ``prefix_task_cols`` [T, L, r],
  ``prefix_task_rows`` [T, r, d]) → one shared prompt + one task per task id, 1:1.
- ``PROMPT_TUNING`` (``prompt_embeddings`` [L, d]) → a shared prompt plus a task with identity
  factors (``U @ V = 1``), so a plain tuned prompt is served unchanged next to MPT tasks.

Only encoder-side prompts are supported for seq2seq models: an adapter saved with
``num_transformer_submodules=2`` also prompts the decoder and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from prompts.artifacts import (
    SharedPrompt,
    TaskFactors,
    check_name,
    check_task_fits,
    validate_shared,
    validate_task,
)
from prompts.compose import identity_factors
from prompts.errors import ArtifactError


def _read_config(path: Path) -> dict[str, Any]:
    path = Path(path)
    config_path = path / "adapter_config.json"
    weights_path = path / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ArtifactError(
            f"{path} is not a PEFT adapter directory: expected adapter_config.json and "
            "adapter_model.safetensors (adapters saved as .bin are not loaded: no pickles)"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{config_path}: cannot read the adapter config: {e}") from e
    if not isinstance(config, dict):
        raise ArtifactError(f"{config_path}: the adapter config must be a JSON object")
    return config


def _read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    config = _read_config(path)
    # PEFT's own default when the field is unset: seq2seq adapters prompt encoder and decoder.
    submodules = config.get("num_transformer_submodules")
    if submodules is None:
        submodules = 2 if config.get("task_type") == "SEQ_2_SEQ_LM" else 1
    if submodules != 1:
        raise ArtifactError(
            f"{path}: num_transformer_submodules={submodules} prompts the decoder too; rankone "
            "prompts the encoder only. Train the adapter with num_transformer_submodules=1."
        )
    try:
        state = load_file(str(Path(path) / "adapter_model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: cannot read the adapter weights: {e}") from e
    return config, state


def peft_type(path: Path) -> str:
    """The ``peft_type`` of the adapter in ``path`` (``MULTITASK_PROMPT_TUNING``, ...)."""
    return str(_read_config(path).get("peft_type"))


def import_peft_mpt(
    path: Path, *, backbone: str, shared_id: str, task_names: list[str] | None = None
) -> tuple[SharedPrompt, list[TaskFactors]]:
    """A PEFT ``MultitaskPromptTuning`` adapter → (shared prompt, tasks in task-id order)."""
    config, state = _read_adapter(path)
    if config.get("peft_type") != "MULTITASK_PROMPT_TUNING":
        raise ArtifactError(
            f"{path}: peft_type is {config.get('peft_type')!r}, expected 'MULTITASK_PROMPT_TUNING'"
        )
    missing = {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"} - set(state)
    if missing:
        raise ArtifactError(f"{path}: adapter weights lack {sorted(missing)}")
    cols, rows = state["prefix_task_cols"], state["prefix_task_rows"]  # [T, L, r], [T, r, d]
    if cols.dim() != 3 or rows.dim() != 3 or cols.shape[0] != rows.shape[0]:
        raise ArtifactError(
            f"{path}: expected prefix_task_cols [T, L, r] and prefix_task_rows [T, r, d], got "
            f"{tuple(cols.shape)} and {tuple(rows.shape)}"
        )
    num_tasks = int(cols.shape[0])
    names = task_names or [f"{shared_id}-task{i}" for i in range(num_tasks)]
    if len(names) != num_tasks:
        raise ArtifactError(f"{path}: adapter has {num_tasks} tasks, {len(names)} names given")
    if len(set(names)) != len(names):
        raise ArtifactError(f"{path}: task names must be distinct, got {names}")
    shared = SharedPrompt(
        id=check_name(shared_id, "shared prompt id"),
        prompt=state["prompt_embeddings"].float(),
        backbone=backbone,
        meta={"source": "peft", "peft_type": "MULTITASK_PROMPT_TUNING"},
    )
    tasks = [
        TaskFactors(
            name=check_name(name, "task name"),
            shared=shared.id,
            u=cols[i].float().contiguous(),
            v=rows[i].float().contiguous(),
            backbone=backbone,
            meta={"source": "peft", "task_id": i},
        )
        for i, name in enumerate(names)
    ]
    validate_shared(shared)
    for task in tasks:
        validate_task(task)
        check_task_fits(task, shared)
    return shared, tasks


def import_peft_prompt_tuning(
    path: Path, *, backbone: str, shared_id: str, task_name: str
) -> tuple[SharedPrompt, TaskFactors]:
    """A PEFT ``PromptTuning`` adapter → (its prompt as a shared prompt, an identity task)."""
    config, state = _read_adapter(path)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise ArtifactError(
            f"{path}: peft_type is {config.get('peft_type')!r}, expected 'PROMPT_TUNING'"
        )
    if "prompt_embeddings" not in state:
        raise ArtifactError(f"{path}: adapter weights lack 'prompt_embeddings'")
    shared = SharedPrompt(
        id=check_name(shared_id, "shared prompt id"),
        prompt=state["prompt_embeddings"].float(),  # [L, d]
        backbone=backbone,
        meta={"source": "peft", "peft_type": "PROMPT_TUNING"},
    )
    validate_shared(shared)
    u, v = identity_factors(shared.length, shared.dim)
    task = TaskFactors(
        name=check_name(task_name, "task name"),
        shared=shared.id,
        u=u,
        v=v,
        backbone=backbone,
        meta={"source": "peft", "identity_factors": True},
    )
    return shared, task
