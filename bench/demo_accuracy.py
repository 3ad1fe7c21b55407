"""Per-task accuracy of the demo through the HTTP API: MPT soft prompt vs written instructions.

Points at a running server (``--url``) or starts one itself on a free port from the demo cache
(``rankone demo --no-serve`` builds it), with a throw-away store so the demo's own store is not
touched. For every task, its held-out test inputs are sent to ``POST /v1/tasks/<task>/generate``
(greedy, lists of inputs per request) under each method:

- ``mpt``: the demo's task (the MPT shared prompt ⊙ the task's rank-one factors); the input
  is sent as it is, with no instruction; when the task data is in chat format (the SmolLM2
  demo: ``{"messages": [user, assistant]}``), the input is sent as the one user message of
  ``POST /v1/chat/completions``, the route those prompts were trained for;
- ``teacher``: the task's prompt-tuning teacher (``teach``; the PT baseline of MPT), asked
  the same way as ``mpt``;
- ``instruction``: the task's instruction written as plain text in front of the input
  (``"<instruction>\n<input>"``: prompt engineering);
- ``instruction-chat`` (backbones with a chat template): the same instruction and input as
  one user message in the model's chat template, the way an instruct model is meant to be
  asked;
- ``base``: the served base model (``model="base"``: the backbone, no soft prompt), asked
  the same way as ``mpt`` (the input alone, as the one user message where the data is chat).

The API always puts a task's soft prompt in front of the input; the written-text methods are
registered through the admin API as *hard* prompts: a shared prompt whose rows are the input
embeddings of the text's tokens (identity factors), which the backbone sees exactly as if the
text had been typed in front of the input (the benchmark checks that the tokens split the
same way; ``token_split_mismatches`` in the JSON).

Scores: ``exact``: the stripped output equals the target; ``contains``: the target occurs in
the output as a word (case-insensitive) and, for classification tasks, no other label does:
lenient to a chatty answer such as "The sentiment is positive.".

    python -m bench.demo_accuracy [--cache .rankone/demo-smollm2] [--url URL] [--limit 48]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import demo_methods as M
from bench.common import RESULTS, Server, free_port, write_json
from trainer.demo.nl_tasks import chat_row

ALL_METHODS = ("mpt", "teacher", "instruction", "instruction-chat", "base")


def post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SystemExit(f"demo_accuracy: {url} → HTTP {e.code}: {e.read()[:500]!r}") from None


def get(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """``{"input", "target"}`` rows; a chat example's last user turn is its input."""
    with path.open(encoding="utf-8") as f:
        return [chat_row(json.loads(line)) for line in f if line.strip()]


def is_chat_data(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        return "messages" in json.loads(f.readline())


def ask_chat(url: str, task: str, inputs: list[str], max_new_tokens: int) -> list[str]:
    """One chat completion per input (sent concurrently, so the server batches them)."""

    def one(text: str) -> str:
        body = {
            "model": task,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_new_tokens,
            "temperature": 0,
        }
        res = post(f"{url}/v1/chat/completions", body)
        return str(res["choices"][0]["message"]["content"])

    with ThreadPoolExecutor(max_workers=len(inputs)) as pool:
        return list(pool.map(one, inputs))


def ask(url: str, how: M.Method, inputs: list[str], max_new_tokens: int) -> list[str]:
    if how.chat:
        return ask_chat(url, how.task, inputs, max_new_tokens)
    res = post(
        f"{url}/v1/tasks/{how.task}/generate",
        {
            "inputs": [x + how.suffix for x in inputs],
            "parameters": {"max_new_tokens": max_new_tokens, "temperature": 0},
        },
    )
    return list(res["texts"])


def demo_server(cache: Path, store: Path) -> Server:
    """``rankone serve`` on the demo cache as ``rankone demo`` runs it, with the store in
    ``store`` (a throw-away one: what a benchmark registers stays out of the demo's)."""
    from trainer.demo import cli as demo_cli

    port = free_port()
    env = demo_cli.server_env(demo_cli.DemoPaths(cache), port)
    env["RANKONE_DATA_DIR"] = str(store)
    return Server(env, port=port)


def register_methods(
    url: str, cache: Path, data: Path, tasks: list[str], backbone: Any, wanted: list[str]
) -> tuple[dict[str, dict[str, M.Method]], dict[str, int]]:
    """Register the hard prompts and teachers through the admin API; ``{method: {task: Method}}``
    and the token-split mismatches per hard prompt."""
    from prompts import load_artifact_dir

    methods: dict[str, dict[str, M.Method]] = {m: {} for m in wanted}
    mismatches: dict[str, int] = {}
    teachers = cache / "runs" / "teach"
    found = load_artifact_dir(teachers) if "teacher" in wanted and teachers.is_dir() else None

    def hard(name: str, text: str) -> None:
        rows = M.hard_prompt_rows(backbone, text)  # [T, d]
        post(f"{url}/v1/shared-prompts", {"blob": M.shared_blob(backbone, name, rows)})
        post(f"{url}/v1/tasks", M.identity_body(name, name, rows.shape[0], rows.shape[1]))

    for task in tasks:
        path = data / task / "instruction.txt"  # the T5 demo's letter tasks have none
        instruction = path.read_text(encoding="utf-8").strip() if path.exists() else None
        inputs = [r["input"] for r in read_jsonl(data / task / "test.jsonl")]
        chat = is_chat_data(data / task / "test.jsonl")
        if "mpt" in wanted:
            methods["mpt"][task] = M.Method(task, chat=chat)
        if "base" in wanted:
            methods["base"][task] = M.Method("base", chat=chat)
        if "instruction" in wanted and instruction is not None:
            name, text = f"bench.{task}.instruction", instruction + "\n"
            hard(name, text)
            methods["instruction"][task] = M.Method(name)
            mismatches[f"instruction/{task}"] = M.split_mismatches(backbone, text, inputs, "")
        frame = M.chat_frame(backbone, instruction) if instruction is not None else None
        if "instruction-chat" in wanted and frame is not None:
            name = f"bench.{task}.chat"
            hard(name, frame[0])
            methods["instruction-chat"][task] = M.Method(name, suffix=frame[1])
            mismatches[f"instruction-chat/{task}"] = M.split_mismatches(
                backbone, frame[0], inputs, frame[1]
            )
        if found is not None and task in found.tasks:
            tf = found.tasks[task]
            name = f"bench.{task}.teacher"
            sp = found.shared[tf.shared]
            rows = sp.prompt.float()
            post(f"{url}/v1/shared-prompts", {"blob": M.shared_blob(backbone, name, rows)})
            body = {"name": name, "shared": name, "u": tf.u.tolist(), "v": tf.v.tolist()}
            post(f"{url}/v1/tasks", body)
            methods["teacher"][task] = M.Method(name, chat=chat)
    return {m: t for m, t in methods.items() if t}, mismatches


def measure(
    url: str,
    data: Path,
    tasks: list[str],
    methods: dict[str, dict[str, M.Method]],
    labels: dict[str, tuple[str, ...]],
    args: argparse.Namespace,
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {method: {exact, contains, n, seconds, misses}}}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task in tasks:
        rows = read_jsonl(data / task / "test.jsonl")[: args.limit]
        out[task] = {}
        for method, per_task in methods.items():
            how = per_task.get(task)
            if how is None:
                continue
            exact = lenient = 0
            misses: list[dict[str, str]] = []
            start = time.monotonic()
            for i in range(0, len(rows), args.batch):
                chunk = rows[i : i + args.batch]
                texts = ask(url, how, [r["input"] for r in chunk], args.max_new_tokens)
                for row, text in zip(chunk, texts, strict=True):
                    hit = text.strip() == row["target"]
                    exact += hit
                    lenient += M.contains(text, row["target"], labels.get(task, ()))
                    if not hit and len(misses) < 3:
                        misses.append({"input": row["input"], "target": row["target"], "got": text})
            n = max(1, len(rows))
            out[task][method] = {
                "exact": exact / n,
                "contains": lenient / n,
                "n": len(rows),
                "seconds": round(time.monotonic() - start, 1),
                "misses": misses,
            }
            print(
                f"{task:>10} {method:>17}: exact {exact / n:6.1%}  contains {lenient / n:6.1%}"
                f"  ({len(rows)} inputs, {out[task][method]['seconds']} s)",
                flush=True,
            )
    return out


def markdown(report: dict[str, Any]) -> str:
    methods = report["methods"]
    lines = [
        "# Demo accuracy through the HTTP API",
        "",
        "Each demo task's held-out test inputs, asked through `POST /v1/tasks/<task>/generate` "
        "(greedy) of a `rankone serve` holding the demo artifacts; **mpt** and **teacher** on "
        "chat-format task data through `POST /v1/chat/completions` (the input as the one user "
        "message). Methods: **mpt** the "
        "served task (shared prompt ⊙ rank-one factors; the input alone); **teacher** its "
        "prompt-tuning teacher; **instruction** the task's instruction written in front of the "
        "input; **instruction-chat** instruction + input as a user turn of the chat template; "
        '**base** the served base model (`model="base"`, no soft prompt), asked as mpt is. Written text is served as a hard prompt (its token '
        "embeddings), identical to typing it (see bench/demo_accuracy.py). **exact**: output "
        "equals the target; **contains**: the target appears as a word (and no other label).",
        "",
        *[f"Command: `{c}`  " for c in report.get("commands", [report["command"]])],
        f"Server: {report['url']} ({report['backbone']})  ",
        f"Demo build: {', '.join(f'{k} {v}' for k, v in report.get('build', {}).items())}  ",
        f"Machine: {report['machine']}  ",
        f"Elapsed: {report['seconds']} s",
        "",
    ]
    for metric in ("exact", "contains"):
        lines += [f"### {metric}", "", "| task | n | " + " | ".join(methods) + " |"]
        lines.append("|---|---|" + "---|" * len(methods))
        for task, per in report["tasks"].items():
            n = next(iter(per.values()))["n"] if per else 0
            cells = [f"{per[m][metric]:.0%}" if m in per else "–" for m in methods]
            lines.append(f"| {task} | {n} | " + " | ".join(cells) + " |")
        means = [report["means"][m][metric] for m in methods]
        lines.append("| **mean** | | " + " | ".join(f"**{v:.0%}**" for v in means) + " |")
        lines.append("")
    wins = report["mpt_beats_instruction"]
    if wins is not None:
        lines += [
            f"MPT beats the best written instruction (exact match) on {wins[0]} of {wins[1]} tasks.",
            "",
        ]
    lines += ["Some misses of mpt (input → target / got):", ""]
    for task, per in report["tasks"].items():
        misses = per.get("mpt", {}).get("misses", [])
        if misses:
            shown = "; ".join(f"`{m['input']}` → `{m['target']}` / `{m['got']!r}`" for m in misses)
            lines.append(f"- {task}: {shown}")
    lines.append("")
    return "\n".join(lines)


def summarise(results: dict[str, dict[str, dict[str, Any]]], methods: list[str]) -> dict[str, Any]:
    means = {
        m: {
            k: sum(r[m][k] for r in results.values() if m in r)
            / max(1, sum(m in r for r in results.values()))
            for k in ("exact", "contains")
        }
        for m in methods
    }
    written = [m for m in ("instruction", "instruction-chat") if m in methods]
    wins = None
    if "mpt" in methods and written:
        tasks = [t for t, r in results.items() if "mpt" in r]
        won = sum(
            results[t]["mpt"]["exact"]
            > max(results[t][w]["exact"] for w in written if w in results[t])
            for t in tasks
        )
        wins = (won, len(tasks))
    return {"means": means, "mpt_beats_instruction": wins}


def backbone_line(url: str) -> str:
    try:
        info = get(f"{url}/v1/info")
    except (urllib.error.URLError, OSError, ValueError):
        return "?"
    bb = info.get("backbone", info)
    bb = bb if isinstance(bb, dict) else {"fingerprint": bb}
    keys = ("name", "fingerprint", "kind", "d", "dtype", "device")
    return ", ".join(f"{k} {bb[k]}" for k in keys if k in bb)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="a running server (admin API open); default: start one")
    p.add_argument("--cache", type=Path, default=Path(".rankone/demo-smollm2"))
    p.add_argument("--data", type=Path, help="task data (default: <cache>/data)")
    p.add_argument("--tasks", nargs="*", help="default: every task the demo built")
    p.add_argument("--methods", nargs="*", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--limit", type=int, default=48, help="test inputs per task")
    p.add_argument("--batch", type=int, default=16, help="inputs per request")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--model", help="backbone to embed hard prompts with (default: the demo's)")
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the other methods' figures of an earlier run in --results (re-measure some)",
    )
    args = p.parse_args(argv)

    from prompts import load_backbone
    from trainer.demo.nl_tasks import NL_TASKS

    data = args.data or args.cache / "data"
    manifest_path = args.cache / "demo.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    tasks = args.tasks or manifest.get("recipe", {}).get("tasks")
    if not tasks:
        raise SystemExit(f"demo_accuracy: no {manifest_path}; build the demo or pass --tasks")
    labels = {t: NL_TASKS[t].labels for t in tasks if t in NL_TASKS}
    started = time.monotonic()
    store = tempfile.TemporaryDirectory(prefix="rankone-bench-store-")
    running = None if args.url else demo_server(args.cache, Path(store.name)).start()
    url = args.url if running is None else running.url
    try:
        backbone = load_backbone(args.model or manifest.get("model") or args.cache / "backbone")
        methods, mismatches = register_methods(url, args.cache, data, tasks, backbone, args.methods)
        results = measure(url, data, tasks, methods, labels, args)
        line = backbone_line(url)
    finally:
        if running is not None:
            running.stop()
        store.cleanup()
    previous = args.results / "demo_accuracy.json"
    command = "python -m bench.demo_accuracy " + " ".join(argv or sys.argv[1:])
    commands = [command]
    if args.update and previous.exists():
        earlier = json.loads(previous.read_text())
        commands = [*earlier.get("commands", [earlier["command"]]), command]
        for task, per in earlier["tasks"].items():
            for method, figures in per.items():
                results.setdefault(task, {}).setdefault(method, figures)
    order = [m for m in ALL_METHODS if any(m in r for r in results.values())]
    report = {
        "url": url if args.url else "a server started by the benchmark (demo cache)",
        "backbone": line,
        "methods": order,
        "tasks": results,
        **summarise(results, order),
        "token_split_mismatches": mismatches,
        "build": {
            k: manifest.get("recipe", {}).get(k)
            for k in ("backbone", "prompt_length", "teach_steps", "distill_steps", "n_train")
        }
        | ({"note": manifest["note"]} if "note" in manifest else {}),
        "seconds": round(time.monotonic() - started),
        "command": command,
        "commands": commands,
        "machine": f"{platform.system()} {platform.machine()}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, 1-minute load average "
        f"{os.getloadavg()[0]:.1f} at the end of the run",
    }
    write_json(args.results, "demo_accuracy", report)
    (args.results / "demo_accuracy.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
