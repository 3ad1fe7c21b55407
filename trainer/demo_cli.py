"""``rankone demo`` (``make demo``): the offline quickstart.

1. Build, once, into ``.rankone/demo/`` (gitignored): a small from-scratch byte-level T5
   backbone (``pretrain-demo``: 3+3 layers, d 128, up to 4,000 steps within 6.3 minutes),
   the synthetic demo task data, and MPT artifacts for the demo tasks (the trainer's
   ``teach`` then ``distill`` stages, run in this process). Each teacher prompt starts from
   its task's marker token (``--init text --init-text <extra_id_k>``: the input the backbone
   was pretrained on) and is tuned briefly; ``distill`` starts from the closed-form rank-one
   fit of the teachers (``trainer.demo.rank_one``) and fine-tunes it briefly. Later runs
   reuse the cache (``--rebuild`` starts over).
2. Start the server (``rankone serve`` as a subprocess; the trainer never imports the
   service) on 127.0.0.1 with the embedded store, seeded from the demo artifacts.
3. Print ready-to-paste ``curl`` and ``openai`` examples and serve until Ctrl-C.

    rankone demo [--port 8000] [--rebuild] [--no-serve]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from trainer.demo.tasks import SOURCE_TASKS, read_jsonl, write_task_data

DEFAULT_CACHE = Path(".rankone") / "demo"
# Bump when the recipe changes so that stale caches are rebuilt.
RECIPE_VERSION = 2


@dataclass
class DemoRecipe:
    """How the demo is built. Sized for ~8 minutes on two idle CPU cores (+ install: ~10)."""

    tasks: list[str] = field(default_factory=lambda: list(SOURCE_TASKS))
    pretrain_args: list[str] = field(
        default_factory=lambda: ["--steps", "4000", "--minutes", "6.3", "--seed", "1"]
    )
    n_train: int = 2000
    n_val: int = 100
    n_test: int = 100
    seed: int = 0
    prompt_length: int = 8
    teach_steps: int = 20
    teach_lr: float = 0.01
    distill_steps: int = 30
    distill_lr: float = 0.01
    batch_size: int = 32

    def to_json(self) -> dict:
        return {"version": RECIPE_VERSION, **self.__dict__}


class DemoPaths:
    def __init__(self, root: Path):
        self.root = root
        self.backbone = root / "backbone"
        self.data = root / "data"
        self.runs = root / "runs"
        self.teach = self.runs / "teach"
        self.distill = self.runs / "distill"
        self.artifacts = root / "artifacts"
        self.store = root / "store"
        self.manifest = root / "demo.json"


def log(msg: str) -> None:
    print(f"[rankone demo] {msg}", flush=True)


def trainer_cmd(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "trainer", stage, *args]


def build_pretrain(paths: DemoPaths, recipe: DemoRecipe) -> None:
    from trainer.demo import pretrain

    if (paths.backbone / "pretrain.json").exists():
        log(f"backbone: cached in {paths.backbone}")
        return
    log("step 1/3: pretraining the demo backbone from scratch (a few minutes on CPU)")
    tmp = paths.backbone.with_name("backbone.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rc = pretrain.main(["--out", str(tmp), "--seed", str(recipe.seed), *recipe.pretrain_args])
    if rc:
        raise SystemExit("rankone demo: pretrain-demo failed")
    shutil.rmtree(paths.backbone, ignore_errors=True)
    tmp.rename(paths.backbone)


def build_data(paths: DemoPaths, recipe: DemoRecipe) -> None:
    done = paths.data / "sizes.json"
    if done.exists():
        log(f"task data: cached in {paths.data}")
        return
    log(f"step 2/3: writing task data for {len(recipe.tasks)} demo tasks")
    sizes = write_task_data(
        paths.data, recipe.tasks, recipe.n_train, recipe.n_val, recipe.n_test, seed=recipe.seed
    )
    done.write_text(json.dumps(sizes, indent=2) + "\n")


def marker_texts(paths: DemoPaths, tasks: list[str]) -> dict[str, str]:
    """Each task's marker token as text (``<extra_id_k>``), from the backbone's pretrain.json."""
    from transformers import ByT5Tokenizer

    markers = json.loads((paths.backbone / "pretrain.json").read_text()).get("markers", {})
    tokenizer = ByT5Tokenizer()
    return {t: tokenizer.convert_ids_to_tokens(int(markers[t])) for t in tasks if t in markers}


def run_trainer(stage: str, *args: str) -> None:
    """One trainer stage, in this process (``python -m trainer STAGE ...`` without the start-up)."""
    from trainer.cli import main as trainer_main

    log(f"$ trainer {stage} " + " ".join(args))
    rc = trainer_main([stage, *args])
    if rc:
        raise SystemExit(f"rankone demo: trainer {stage} failed (exit {rc})")


def build_prompts(paths: DemoPaths, recipe: DemoRecipe) -> None:
    from trainer.demo.rank_one import rank_one_factors, seed_distill_checkpoint, teacher_prompts

    if paths.manifest.exists() and any((paths.artifacts / "tasks").glob("*.safetensors")):
        log(f"prompts: cached in {paths.artifacts}")
        return
    log("step 3/3: training the MPT prompts (teach, then distill) on the frozen backbone")
    common = [
        "--model", str(paths.backbone),
        "--data-dir", str(paths.data),
        "--prompt-length", str(recipe.prompt_length),
        "--batch-size", str(recipe.batch_size),
        "--seed", str(recipe.seed),
        "--device", "cpu",
        "--eval-limit", str(recipe.n_val),
        "--no-progress",
    ]  # fmt: skip
    # Teachers: one prompt-tuning run per task, each prompt initialised from its task's marker
    # token (every row = the marker's embedding: an input the backbone was pretrained on).
    markers = marker_texts(paths, recipe.tasks)
    shutil.rmtree(paths.teach, ignore_errors=True)
    for sub in ("shared", "tasks"):
        (paths.teach / sub).mkdir(parents=True, exist_ok=True)
    for task in recipe.tasks:
        init = ["--init", "text", "--init-text", markers[task]] if task in markers else []
        out = paths.runs / f"teach-{task}"
        shutil.rmtree(out, ignore_errors=True)
        run_trainer(
            "teach",
            *common,
            "--tasks", task,
            "--lr", str(recipe.teach_lr),
            "--steps", str(recipe.teach_steps),
            "--out", str(out),
            *init,
        )  # fmt: skip
        for sub in ("shared", "tasks"):
            for f in (out / sub).glob("*.safetensors"):
                shutil.copy2(f, paths.teach / sub / f.name)
    # Distill: MPT source training (shared P + rank-one u_k, v_k), started from the closed-form
    # rank-one fit of the teachers (P ⊙ (u_k v_k) ≈ teacher k) through the trainer's resume
    # hook: --stop-after 1 writes a checkpoint, the demo rewrites it, --resume trains on.
    distill = [
        *common,
        "--tasks", *recipe.tasks,
        "--lr", str(recipe.distill_lr),
        "--steps", str(recipe.distill_steps),
        "--teachers", str(paths.teach),
        "--factor-init", "ones",
        "--out", str(paths.distill),
    ]  # fmt: skip
    shutil.rmtree(paths.distill, ignore_errors=True)
    run_trainer("distill", *distill, "--stop-after", "1")
    shared, factors = rank_one_factors(teacher_prompts(paths.teach, recipe.tasks))
    seed_distill_checkpoint(paths.distill / "checkpoints" / "distill.pt", shared, factors)
    log("distill: seeded with the closed-form rank-one fit of the teachers")
    run_trainer("distill", *distill, "--resume")
    shutil.rmtree(paths.artifacts, ignore_errors=True)
    for sub in ("shared", "tasks"):
        shutil.copytree(paths.distill / sub, paths.artifacts / sub)


def build(paths: DemoPaths, recipe: DemoRecipe, *, rebuild: bool) -> dict:
    if rebuild and paths.root.exists():
        log(f"--rebuild: removing {paths.root}")
        shutil.rmtree(paths.root)
    if paths.manifest.exists():
        manifest = json.loads(paths.manifest.read_text())
        if manifest.get("recipe", {}).get("version") != RECIPE_VERSION:
            log("the cached demo was built by an older recipe; rebuilding")
            shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    build_pretrain(paths, recipe)
    build_data(paths, recipe)
    build_prompts(paths, recipe)
    if not paths.manifest.exists():
        from trainer.demo.evaluate import evaluate_artifacts

        log("checking the prompts: exact match on the held-out test split (greedy)")
        em = evaluate_artifacts(paths.backbone, paths.artifacts, paths.data, recipe.tasks)
        log("exact match: " + ", ".join(f"{t} {v:.0%}" for t, v in em.items()))
        manifest = {
            "recipe": recipe.to_json(),
            "build_seconds": round(time.monotonic() - start),
            "test_exact_match": em,
        }
        paths.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    return json.loads(paths.manifest.read_text())


def server_env(paths: DemoPaths, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RANKONE_MODEL": str(paths.backbone.resolve()),
            "RANKONE_SEED_DIR": str(paths.artifacts.resolve()),
            "RANKONE_DATA_DIR": str(paths.store.resolve()),
            "RANKONE_REDIS_URL": "",
            "RANKONE_HOST": "127.0.0.1",
            "RANKONE_PORT": str(port),
            "RANKONE_DEVICE": env.get("RANKONE_DEVICE", "cpu"),
            "RANKONE_LOG_FORMAT": env.get("RANKONE_LOG_FORMAT", "text"),
            "RANKONE_LOG_LEVEL": env.get("RANKONE_LOG_LEVEL", "WARNING"),
        }
    )
    return env


def start_server(paths: DemoPaths, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rankone_cli", "serve"]
    log(f"starting the server: rankone serve on http://127.0.0.1:{port}")
    return subprocess.Popen(cmd, env=server_env(paths, port))


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def example_input(paths: DemoPaths, task: str) -> str:
    try:
        return read_jsonl(paths.data / task / "test.jsonl")[0]["input"]
    except (OSError, IndexError, KeyError):
        return "hello"


def usage_examples(url: str, task: str, text: str, tasks: list[str]) -> str:
    body = json.dumps({"inputs": text, "parameters": {"max_new_tokens": 16}})
    return f"""
The demo tasks ({", ".join(tasks)}) are served at {url}:
each one is only a rank-one pair of vectors over one shared soft prompt.

curl:
  curl -s {url}/v1/tasks/{task}/generate \\
    -H 'Content-Type: application/json' \\
    -d '{body}'

Python (the official openai client; the model name is the task name):
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  out = client.completions.create(model="{task}", prompt="{text}", max_tokens=16)
  print(out.choices[0].text)

Press Ctrl-C to stop.
"""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(paths: DemoPaths, tasks: list[str], port: int) -> int:
    # SIGTERM (docker stop, systemd, kill) takes the Ctrl-C path, so the server child is
    # stopped with us instead of being orphaned.
    signal.signal(signal.SIGTERM, _interrupt)
    proc = start_server(paths, port)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(url, proc):
            log("the server did not become ready; see its log above")
            return 1
        task = "reverse" if "reverse" in tasks else tasks[0]
        print(usage_examples(url, task, example_input(paths, task), tasks), flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        log("stopping the server")
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rankone demo",
        description="Offline quickstart: build a demo backbone + MPT prompts (cached in "
        ".rankone/demo/) and serve them.",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--rebuild", action="store_true", help="discard the cache and build again")
    p.add_argument("--no-serve", action="store_true", help="build (or check) the cache only")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help="where the demo is built (default: .rankone/demo)",
    )
    d = DemoRecipe()
    p.add_argument(
        "--pretrain-minutes",
        type=float,
        default=None,
        help="time budget of the backbone pretraining (default 6.3)",
    )
    p.add_argument(
        "--teach-steps",
        type=int,
        default=d.teach_steps,
        help="prompt-tuning steps per teacher (source task)",
    )
    p.add_argument(
        "--distill-steps", type=int, default=d.distill_steps, help="MPT source-training steps"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipe = DemoRecipe(teach_steps=args.teach_steps, distill_steps=args.distill_steps)
    if args.pretrain_minutes is not None:
        recipe.pretrain_args = [*recipe.pretrain_args, "--minutes", str(args.pretrain_minutes)]
    paths = DemoPaths(args.cache_dir)
    manifest = build(paths, recipe, rebuild=args.rebuild)
    log(f"demo ready in {paths.root} (backbone, data, artifacts)")
    if args.no_serve:
        return 0
    return serve(paths, manifest["recipe"]["tasks"], args.port)


if __name__ == "__main__":
    raise SystemExit(main())
