"""What every demo recipe shares: the cache layout, log lines, and the MPT training steps.

The training steps are the trainer's own stages, run in this process
(``trainer.cli.main``): ``teach`` (one prompt-tuning teacher per task, each initialised from
its task's text: ``--init-texts`` / ``instruction.txt``), then ``distill`` (the MPT shared
prompt and rank-one factors, from the closed-form rank-one fit of the teachers,
``--factor-init fit``), whose artifacts become ``<cache>/artifacts``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.progress import clock, observe


class DemoPaths:
    """``<cache>/``: backbone/ (T5 demo only), data/, runs/, artifacts/, store/, demo.json."""

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


_START = time.monotonic()


def log(msg: str) -> None:
    """One progress line, with the minutes since the demo started."""
    elapsed = time.monotonic() - _START
    print(f"[rankone demo {int(elapsed // 60):d}:{int(elapsed % 60):02d}] {msg}", flush=True)


class BuildClock:
    """One overall line for the whole build: the share of its training steps done, the time
    since it began and the time left. The first estimate comes from per-step priors measured
    on a quiet 2-core machine; once steps run, the priors are scaled by how fast this machine
    actually goes, so the estimate is revised as the build advances."""

    def __init__(
        self,
        stages: list[tuple[str, int, float]],
        *,
        every_s: float = 30.0,
        say: Callable[[str], None] = log,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        """``stages``: (bar label prefix, steps, prior seconds per step), in build order."""
        self.stages, self.every_s, self.say, self.now = stages, every_s, say, now
        self.done: dict[str, int] = {}  # steps done per bar label
        self.start = now()
        self.last = -math.inf
        # The pace is measured from the first step seen on, so that loading the model before
        # it does not count as slow training.
        self.anchor: tuple[float, float] | None = None  # (time, prior seconds done) then

    def _prior(self, label: str) -> float:
        return next(per for prefix, _, per in self.stages if label.startswith(prefix))

    def estimate(self) -> tuple[float, float]:
        """(fraction of the prior work done, seconds left)."""
        total = sum(steps * per for _, steps, per in self.stages)
        done = self._done()
        rate = 1.0  # seconds here per prior second: the priors until two steps were seen
        if self.anchor is not None and done > self.anchor[1]:
            rate = (self.now() - self.anchor[0]) / (done - self.anchor[1])
        return (done / total if total else 1.0), max(0.0, total - done) * rate

    def _done(self) -> float:
        return sum(n * self._prior(label) for label, n in self.done.items())

    def line(self) -> str:
        frac, left = self.estimate()
        return (
            f"build: {frac:.0%} of the training steps done, {clock(self.now() - self.start)} "
            f"elapsed, about {clock(left)} left"
        )

    def __call__(self, label: str, done: int, total: int) -> None:
        """A bar's update (``trainer.progress.observe``): a line every ``every_s`` seconds."""
        if not any(label.startswith(prefix) for prefix, _, _ in self.stages):
            return
        self.done[label] = done
        if self.anchor is None:
            self.anchor = (self.now(), self._done())
        if self.now() - self.last >= self.every_s:
            self.last = self.now()
            self.say(self.line())


def run_trainer(stage: str, *args: str) -> None:
    """One trainer stage, in this process (``python -m trainer STAGE ...`` without the start-up)."""
    from trainer.cli import main as trainer_main

    log(f"$ rankone train {stage} " + " ".join(args))
    rc = trainer_main([stage, *args])
    if rc:
        raise SystemExit(f"rankone demo: trainer {stage} failed (exit {rc})")


@dataclass
class TrainingPlan:
    """The trainer options of the demo's teach and distill stages."""

    model: str
    tasks: list[str]
    prompt_length: int
    batch_size: int
    teach_steps: int
    teach_lr: float
    distill_steps: int
    distill_lr: float
    max_input_length: int
    max_target_length: int
    eval_limit: int
    seed: int = 0
    progress: bool = True
    lambda_hid: float = 1.0
    # Seconds per step on a quiet 2-core machine (SmolLM2 demo, 2026-12-02: teach 206 s for
    # 6 x 20 steps, distill 250 s for 100): the overall line's first estimate only.
    teach_step_s: float = 1.7
    distill_step_s: float = 2.5

    @classmethod
    def from_recipe(cls, recipe: Any, model: str, **options: Any) -> TrainingPlan:
        """The plan of a demo recipe (T5Recipe, SmolRecipe): the fields they share, plus the
        backbone-specific ``options`` (sequence lengths, loss weights)."""
        return cls(
            model=model,
            tasks=recipe.tasks,
            prompt_length=recipe.prompt_length,
            batch_size=recipe.batch_size,
            teach_steps=recipe.teach_steps,
            teach_lr=recipe.teach_lr,
            distill_steps=recipe.distill_steps,
            distill_lr=recipe.distill_lr,
            eval_limit=recipe.n_val,
            seed=recipe.seed,
            progress=recipe.progress,
            **options,
        )


def train_prompts(paths: DemoPaths, plan: TrainingPlan, teach_extra: list[str]) -> None:
    """teach (all tasks, one run) → distill from the rank-one fit → ``<cache>/artifacts``."""
    common = [
        "--model", plan.model,
        "--data-dir", str(paths.data),
        "--tasks", *plan.tasks,
        "--prompt-length", str(plan.prompt_length),
        "--batch-size", str(plan.batch_size),
        "--max-input-length", str(plan.max_input_length),
        "--max-target-length", str(plan.max_target_length),
        "--seed", str(plan.seed),
        "--device", "cpu",
        "--eval-limit", str(plan.eval_limit),
        "--progress" if plan.progress else "--no-progress",
    ]  # fmt: skip
    shutil.rmtree(paths.runs, ignore_errors=True)
    build = BuildClock(
        [
            ("teach", len(plan.tasks) * plan.teach_steps, plan.teach_step_s),
            ("distill", plan.distill_steps, plan.distill_step_s),
        ]
    )
    log(
        f"teach: {len(plan.tasks)} teacher prompt(s), {plan.teach_steps} steps each "
        f"({len(plan.tasks) * plan.teach_steps} steps in all); training estimate "
        f"{clock(build.estimate()[1])}, revised as it runs"
    )
    with observe(build):
        _teach_and_distill(paths, plan, common, teach_extra)
    log(build.line())
    tmp = paths.artifacts.with_name("artifacts.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("shared", "tasks"):
        shutil.copytree(paths.distill / sub, tmp / sub)
    shutil.rmtree(paths.artifacts, ignore_errors=True)
    tmp.rename(paths.artifacts)


def _teach_and_distill(
    paths: DemoPaths, plan: TrainingPlan, common: list[str], teach_extra: list[str]
) -> None:
    run_trainer(
        "teach", *common,
        "--lr", str(plan.teach_lr),
        "--steps", str(plan.teach_steps),
        "--out", str(paths.teach),
        *teach_extra,
    )  # fmt: skip
    log(f"distill: the MPT shared prompt + rank-one factors, {plan.distill_steps} steps")
    run_trainer(
        "distill", *common,
        "--lr", str(plan.distill_lr),
        "--steps", str(plan.distill_steps),
        "--teachers", str(paths.teach),
        "--factor-init", "fit",
        "--lambda-hid", str(plan.lambda_hid),
        "--out", str(paths.distill),
    )  # fmt: skip


def read_manifest(paths: DemoPaths) -> dict[str, Any] | None:
    if not paths.manifest.exists():
        return None
    try:
        manifest: dict[str, Any] = json.loads(paths.manifest.read_text())
    except ValueError:
        return None
    return manifest


def reset_stale_cache(paths: DemoPaths, backbone: str, version: int, *, rebuild: bool) -> None:
    """Start over on --rebuild, or when the cache holds another backbone or recipe version."""
    manifest = read_manifest(paths)
    if rebuild and paths.root.exists():
        log(f"--rebuild: removing {paths.root}")
        shutil.rmtree(paths.root)
    elif manifest is not None:
        recipe = manifest.get("recipe", {})
        if recipe.get("backbone", "t5-demo") != backbone or recipe.get("version") != version:
            log(
                f"the cache in {paths.root} holds another demo build "
                f"({recipe.get('backbone', 't5-demo')}, recipe v{recipe.get('version')}); "
                f"rebuilding it for {backbone} (v{version})"
            )
            shutil.rmtree(paths.root)
    paths.root.mkdir(parents=True, exist_ok=True)
