"""``rankone train <stage>`` / ``python -m trainer <stage>``: the trainer's command line.

Stages, in pipeline order (every option also reads from ``--config run.yaml|json``)::

    rankone train teach    --model M --data-dir data --tasks a b --out runs/teach
    rankone train distill  --model M --data-dir data --tasks a b --teachers runs/teach --out runs/mpt
    rankone train adapt    --model M --data-dir data --tasks c --source runs/mpt --out runs/adapt
    rankone train evaluate --model M --data-dir data --tasks c \\
                           --methods mpt=runs/adapt pt=runs/teach-c --out runs/eval

Bad options, data or artifacts print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from prompts.errors import RankoneError
from trainer.config import parse_options
from trainer.options import AdaptOptions, DistillOptions, EvaluateOptions, TeachOptions

STAGES: dict[str, tuple[type, str, str]] = {
    "teach": (
        TeachOptions,
        "trainer.teach",
        "plain prompt tuning of one teacher prompt per source task (also the PT baseline)",
    ),
    "distill": (
        DistillOptions,
        "trainer.distill",
        "MPT source training: shared prompt + rank-r factors per task, distilled from teachers",
    ),
    "adapt": (
        AdaptOptions,
        "trainer.adapt",
        "target adaptation: factors of new tasks from the source average (P frozen by default)",
    ),
    "evaluate": (
        EvaluateOptions,
        "trainer.evaluate",
        "exact match / accuracy / F1 per task for artifact sets: table, JSON and bar chart",
    ),
}


def usage() -> str:
    lines = [
        "usage: rankone train <stage> [options]   (or: python -m trainer <stage>)",
        "",
        "stages:",
    ]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in STAGES.items()]
    lines += [
        f"  {'pretrain-demo':<14} pretrain the demo backbone (see trainer.demo)",
        "",
        "Run 'rankone train <stage> --help' for a stage's options.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    stage, rest = args[0], args[1:]
    if stage == "pretrain-demo":
        demo: Callable[[list[str]], Any] = importlib.import_module("trainer.demo.pretrain").main
        return int(demo(rest) or 0)
    if stage not in STAGES:
        print(f"rankone train: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    options_cls, module, description = STAGES[stage]
    try:
        options: Any = parse_options(options_cls, rest, f"rankone train {stage}", description)
        return int(importlib.import_module(module).run(options) or 0)
    except RankoneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
