"""``rankone push`` / ``rankone tasks`` / ``rankone generate``: the client from a shell.

``--url`` and ``--key`` default to ``$RANKONE_URL`` (else http://127.0.0.1:8000) and
``$RANKONE_KEY``. A refusal by the server prints its code and message on stderr (exit 1); a
bad artifact directory or bad options exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from client.artifacts import ArtifactReadError
from client.errors import RankoneError
from client.sync import Client


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="server URL [env RANKONE_URL; default http://127.0.0.1:8000]")
    p.add_argument("--key", help="API key: admin key for push/tasks [env RANKONE_KEY]")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")


def _run(prog: str, body: Callable[[Client], int], args: argparse.Namespace) -> int:
    try:
        with Client(args.url, args.key, timeout=args.timeout) as c:
            return body(c)
    except ArtifactReadError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except RankoneError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1


def push_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="rankone push",
        description="Upload a trainer output directory (shared/*.safetensors first, then "
        "tasks/*.safetensors) to a server: each one is created, replaced when its tensors "
        "differ, or left unchanged. Prints what changed.",
    )
    p.add_argument("artifact_dir", type=Path, help="the --out of a `rankone train` stage")
    p.add_argument("--dry-run", action="store_true", help="only compare; write nothing")
    _connection(p)
    args = p.parse_args(argv)

    def body(c: Client) -> int:
        print(c.push(args.artifact_dir, dry_run=args.dry_run).summary())
        return 0

    return _run("rankone push", body, args)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def tasks_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rankone tasks", description="The tasks a server serves.")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="every task: name, shared prompt, version, rank, L")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    show = sub.add_parser("show", help="one task as JSON")
    show.add_argument("name")
    show.add_argument("--factors", action="store_true", help="include u and v")
    delete = sub.add_parser("delete", help="delete a task")
    delete.add_argument("name")
    for sp in (ls, show, delete):
        _connection(sp)
    args = p.parse_args(argv)

    def body(c: Client) -> int:
        if args.action == "list":
            return _list(c, args.json)
        if args.action == "show":
            info = asdict(c.tasks.get(args.name, include_factors=args.factors))
            info.pop("raw", None)
            print(json.dumps({k: v for k, v in info.items() if v is not None}, indent=2))
            return 0
        c.tasks.delete(args.name)
        print(f"deleted task {args.name}")
        return 0

    return _run("rankone tasks", body, args)


def _list(c: Client, as_json: bool) -> int:
    rows = [["NAME", "SHARED", "VERSION", "RANK", "L", "UPDATED"]]
    for t in c.tasks.list():
        if as_json:
            info = asdict(t)
            info.pop("raw", None)
            print(json.dumps({k: v for k, v in info.items() if v is not None}))
            continue
        rows.append([t.name, t.shared, str(t.version), str(t.rank), str(t.length), t.updated])
    if not as_json:
        print(_table(rows) if len(rows) > 1 else "no tasks")
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="rankone generate",
        description="Generate with a served task: one output line per input (greedy unless "
        "--temperature is given).",
    )
    p.add_argument("task")
    p.add_argument("inputs", nargs="+", help="one or more inputs (one request each)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    _connection(p)
    args = p.parse_args(argv)
    params: dict[str, Any] = {
        k: v
        for k, v in (
            ("max_new_tokens", args.max_new_tokens),
            ("temperature", args.temperature),
            ("seed", args.seed),
        )
        if v is not None
    }

    def body(c: Client) -> int:
        if not args.stream:
            for text in c.generate(args.task, list(args.inputs), **params).texts:
                print(text)
            return 0
        for one in args.inputs:  # streaming takes one input per request
            for event in c.stream(args.task, one, **params):
                print(event.text, end="", flush=True)
            print()
        return 0

    return _run("rankone generate", body, args)
