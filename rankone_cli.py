"""The ``rankone`` command: one entry point, subcommands provided by the packages.

rankone train <stage> ...   the MPT trainer (teach, distill, adapt, evaluate, pretrain-demo)
rankone serve ...           the HTTP server
rankone worker ...          a fine-tuning worker (claims jobs from a server)
rankone demo ...            the offline quickstart (build demo artifacts, serve them)
rankone import-peft ...     convert a PEFT prompt adapter into rankone artifacts
rankone push <dir> ...      upload a trainer output directory to a server
rankone tasks list|show|delete   the tasks a server serves
rankone generate <task> <input>...   generate with a served task
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": (
        "trainer.cli",
        "main",
        "the MPT trainer: teach, distill, adapt, evaluate, pretrain-demo",
    ),
    "serve": ("service.cli", "main", "run the HTTP server"),
    "worker": ("trainer.worker", "main", "run the server's fine-tuning jobs (an API client)"),
    "demo": ("trainer.demo.cli", "main", "offline quickstart: build demo artifacts and serve them"),
    "import-peft": (
        "prompts.cli",
        "import_peft_main",
        "convert a PEFT prompt adapter to artifacts",
    ),
    "push": ("client.cli", "push_main", "upload a trainer output directory to a server"),
    "tasks": ("client.cli", "tasks_main", "list, show or delete a server's tasks"),
    "generate": ("client.cli", "generate_main", "generate with a served task"),
}


def usage() -> str:
    lines = ["usage: rankone <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run 'rankone <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"rankone: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = SUBCOMMANDS[command]
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
