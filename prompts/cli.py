"""``rankone import-peft``: convert a PEFT prompt adapter into rankone artifacts.

    rankone import-peft ADAPTER_DIR --model MODEL_DIR --out ARTIFACT_DIR --shared-id ID \\
        [--task-names a,b,c] [--task-name x] [--force]

A ``MULTITASK_PROMPT_TUNING`` adapter becomes one shared prompt plus one task per task id
(``--task-names``, default ``<ID>-task<i>``); a ``PROMPT_TUNING`` adapter becomes a shared
prompt plus one task with identity factors (``--task-name``, default ``ID``). The model is
loaded only for its fingerprint, which the artifacts carry. Existing artifacts are not
overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prompts.artifacts import (
    SharedPrompt,
    TaskFactors,
    save_shared,
    save_task,
    shared_path,
    task_path,
)
from prompts.backbone import load_backbone
from prompts.errors import ArtifactError, RankoneError
from prompts.peft_import import import_peft_mpt, import_peft_prompt_tuning, peft_type


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankone import-peft",
        description="Convert a PEFT prompt adapter (MULTITASK_PROMPT_TUNING or PROMPT_TUNING) "
        "into rankone artifacts under ARTIFACT_DIR/shared and ARTIFACT_DIR/tasks.",
    )
    parser.add_argument(
        "adapter_dir",
        type=Path,
        metavar="ADAPTER_DIR",
        help="a directory saved by PEFT save_pretrained",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODEL_DIR",
        help="the backbone the adapter was trained on (a local model directory)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="ARTIFACT_DIR",
        help="the artifact directory to write",
    )
    parser.add_argument(
        "--shared-id", required=True, metavar="ID", help="id of the shared prompt to write"
    )
    parser.add_argument(
        "--task-names",
        metavar="A,B,C",
        help="MPT only: comma-separated task names in task-id order (default <ID>-task<i>)",
    )
    parser.add_argument(
        "--task-name", metavar="NAME", help="PROMPT_TUNING only: the task name (default ID)"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite artifacts that already exist in --out"
    )
    return parser


def _import(args: argparse.Namespace) -> tuple[SharedPrompt, list[TaskFactors]]:
    kind = peft_type(args.adapter_dir)
    if kind not in {"MULTITASK_PROMPT_TUNING", "PROMPT_TUNING"}:
        raise ArtifactError(
            f"{args.adapter_dir}: peft_type {kind!r} is not supported; "
            "use a MULTITASK_PROMPT_TUNING or PROMPT_TUNING adapter"
        )
    if kind == "MULTITASK_PROMPT_TUNING" and args.task_name is not None:
        raise RankoneError("--task-name is for PROMPT_TUNING adapters; use --task-names for MPT")
    if kind == "PROMPT_TUNING" and args.task_names is not None:
        raise RankoneError("--task-names is for MPT adapters; use --task-name for PROMPT_TUNING")
    backbone = load_backbone(args.model)
    if kind == "MULTITASK_PROMPT_TUNING":
        names = [n.strip() for n in args.task_names.split(",")] if args.task_names else None
        shared, tasks = import_peft_mpt(
            args.adapter_dir,
            backbone=backbone.fingerprint,
            shared_id=args.shared_id,
            task_names=names,
        )
    else:
        shared, task = import_peft_prompt_tuning(
            args.adapter_dir,
            backbone=backbone.fingerprint,
            shared_id=args.shared_id,
            task_name=args.task_name or args.shared_id,
        )
        tasks = [task]
    if shared.dim != backbone.dim:
        raise ArtifactError(
            f"{args.adapter_dir}: the adapter's prompt has width {shared.dim}, but {args.model} "
            f"embeds tokens with width {backbone.dim}: was it trained on another model?"
        )
    return shared, tasks


def import_peft_main(argv: list[str]) -> int:
    """Run ``rankone import-peft``; returns the exit status (2 on a bad adapter or argument)."""
    args = _parser().parse_args(argv)
    try:
        shared, tasks = _import(args)
        targets = [shared_path(args.out, shared.id), *(task_path(args.out, t.name) for t in tasks)]
        existing = [str(path) for path in targets if path.exists()]
        if existing and not args.force:
            # Replacing a shared prompt silently would change every task already composed on it.
            raise ArtifactError(
                f"{', '.join(existing)} already exist(s); pass --force to overwrite"
            )
        print(
            f"{save_shared(args.out, shared)}: shared prompt {shared.id!r} [L={shared.length}, "
            f"d={shared.dim}], backbone {shared.backbone}"
        )
        for task in tasks:
            print(f"{save_task(args.out, task)}: task {task.name!r} rank {task.rank}")
    except (RankoneError, OSError) as e:
        print(f"rankone import-peft: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(import_peft_main(sys.argv[1:]))
