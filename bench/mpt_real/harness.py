"""The benchmark's units of work, each resumable: train one method on one target, score it.

A *unit* is one trainer stage (or one LoRA run) plus its scoring; its record is written to
``<work>/units/<key>.json`` when it finishes, and a rerun of the same command skips every
unit that has a record, so an interrupted benchmark continues where it stopped. Training
goes through the trainer's own CLI (``trainer.cli.main``) in this process, with the backbone
loaded once (the stages' ``load_backbone`` is memoised here).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import trainer.setup
from bench.mpt_real.lora import train_lora
from bench.mpt_real.presets import Preset
from bench.mpt_real.tasks import SOURCES, TARGETS, generate, instruction, write_suite
from prompts import Backbone, load_backbone
from trainer.data import Example, Tokenized, few_shot, tokenize
from trainer.evaluate import method_prompts
from trainer.generate import greedy
from trainer.loop import TaskData
from trainer.metrics import exact_match, normalize
from trainer.options import TrainOptions

PROMPT_METHODS = ["pt", "pt_random", "mpt_factors", "mpt_paper", "mpt_mt", "lora"]


class OutOfBudget(Exception):
    """The time budget is spent: stop starting units (records so far stay)."""


class Bench:
    def __init__(self, preset: Preset, model: str, work: Path, budget_s: float | None) -> None:
        self.preset, self.model, self.work = preset, model, work
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.data = work / "data"
        self.units = work / "units"
        self.units.mkdir(parents=True, exist_ok=True)
        self.counts = write_suite(self.data, preset.sizes)
        self._backbone: Backbone | None = None
        self.samples: dict[str, list[str]] = {}  # predictions of the running unit, per task
        self.log = work / "bench.log"
        trainer.setup.load_backbone = self._stage_backbone  # type: ignore[assignment]

    # --- plumbing --------------------------------------------------------------------------

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.model, device=torch.device("cpu"))
        return self._backbone

    def _stage_backbone(self, model: str, **_: Any) -> Backbone:
        """Every stage's start() loads the backbone: hand it the one already in memory."""
        if model != self.model:
            raise SystemExit(f"mpt_real: a stage asked for {model}, the bench runs {self.model}")
        return self.backbone

    def say(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        print(line, flush=True)
        with self.log.open("a") as f:
            f.write(line + "\n")

    def record(self, key: str) -> dict[str, Any] | None:
        path = self.units / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def unit(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The unit's record: from disk when done before, else run it (if budget is left)."""
        done = self.record(key)
        if done is not None:
            return done
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfBudget(key)
        start = time.monotonic()
        self.say(f"start {key}")
        self.samples = {}
        result = {"key": key, **fn()}
        result["samples"] = {t: preds[:6] for t, preds in self.samples.items()}
        result["seconds"] = round(time.monotonic() - start, 1)
        tmp = self.units / f"{key}.json.tmp"
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(self.units / f"{key}.json")
        self.say(f"done  {key} in {result['seconds']:.0f}s {_brief(result)}")
        return result

    def stage(self, name: str, *args: str) -> None:
        from trainer.cli import main

        code = main([name, "--model", self.model, "--data-dir", str(self.data), *args])
        if code != 0:
            raise SystemExit(f"mpt_real: trainer {name} failed with exit {code} ({args})")

    def train_args(
        self, *, steps: int, lr: float, seed: int, shots: int | None, source: bool = False
    ) -> list[str]:
        p = self.preset
        every = p.source_eval_every if source else p.eval_every
        args = [
            "--prompt-length", str(p.prompt_length), "--rank", str(p.rank),
            "--batch-size", str(p.batch_size), "--steps", str(steps), "--lr", str(lr),
            "--seed", str(seed), "--eval-every", str(every),
            "--max-input-length", str(p.max_input_length),
            "--max-target-length", str(p.max_target_length),
            "--eval-limit", str(p.sizes["validation"]), "--no-progress", "--device", "cpu",
        ]  # fmt: skip
        return [*args, "--shots", str(shots)] if shots is not None else args

    # --- scoring ---------------------------------------------------------------------------

    def examples(self, task: str, split: str) -> list[Example]:
        rows = generate(task, self.preset.sizes, seed=0)[split]
        return [Example(x, y) for x, y in rows]

    def tokens(self, examples: list[Example]) -> list[Tokenized]:
        return tokenize(
            self.backbone.tokenizer,
            examples,
            max_input_length=self.preset.max_input_length + 64,  # room for the text baseline
            max_target_length=self.preset.max_target_length,
            causal=True,
        )

    def exact_match(
        self,
        task: str,
        prompt: torch.Tensor | None,
        *,
        backbone: Backbone | None = None,
        text: bool = False,
        lenient: bool = False,
    ) -> float:
        """Exact match (%) on the test split: greedy answer's first line vs the target.

        ``lenient``: the normalised target occurs anywhere in the answer (for the text
        baseline, whose instruct model answers in sentences)."""
        bb = backbone or self.backbone
        rows = self.examples(task, "test")
        if text:
            rows = [Example(self.chat(task, e.input), e.target) for e in rows]
        inputs = [t.input_ids for t in self.tokens(rows)]
        hits = 0.0
        for start in range(0, len(inputs), 16):
            chunk = inputs[start : start + 16]
            prompts = None if prompt is None else prompt[None].expand(len(chunk), -1, -1)
            ids = greedy(bb, prompts, chunk, self.preset.max_new_tokens)
            texts = bb.tokenizer.batch_decode(ids, skip_special_tokens=True)
            for pred, ex in zip(texts, rows[start : start + 16], strict=True):
                first = pred.strip().split("\n")[0]
                if lenient:
                    hits += float(f" {normalize(ex.target)} " in f" {normalize(pred)} ")
                else:
                    hits += exact_match(first, ex.target)
                self.samples.setdefault(task, []).append(pred)
        return round(100 * hits / max(len(rows), 1), 2)

    def chat(self, task: str, text: str) -> str:
        """The text baseline's input: the instruction and the input as one chat user turn."""
        ask = f"{instruction(task)} Reply with the answer only.\n{text}"
        messages = [{"role": "user", "content": ask}]
        rendered = self.backbone.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return str(rendered)

    def score_dir(self, out: Path, tasks: list[str]) -> dict[str, float]:
        prompts = method_prompts(out.name, out, self.backbone)
        return {t: self.exact_match(t, prompts[t]) for t in tasks}

    # --- source training -------------------------------------------------------------------

    @property
    def teachers(self) -> Path:
        return self.work / "src" / "teachers"

    def teach_source(self, task: str) -> dict[str, Any]:
        p = self.preset

        def run() -> dict[str, Any]:
            self.stage(
                "teach", "--tasks", task, "--init", "text", "--init-text", instruction(task),
                *self.train_args(steps=p.teach_steps, lr=p.teach_lr, seed=0, shots=None, source=True),
                "--out", str(self.teachers),
            )  # fmt: skip
            metrics = json.loads((self.teachers / "run.json").read_text())["metrics"][task]
            return {
                "val_loss": metrics["best_val_loss"],
                "history": _history(self.teachers, f"teach-{task}"),
            }

        return self.unit(f"src-teach-{task}", run)

    def teachers_on_sources(self) -> dict[str, Any]:
        """The teachers' own test exact match on their source tasks (what distill aims at)."""

        def run() -> dict[str, Any]:
            return {"source_em": self.score_dir(self.teachers, SOURCES)}

        return self.unit("src-teachers-eval", run)

    def distill(self, variant: str) -> Path:
        p = self.preset
        out = self.work / "src" / f"distill-{variant}"
        init = ["--factor-init", p.factor_init]
        extra = {
            "main": init,
            "no_distill": [*init, "--lambda-kl", "0", "--lambda-hid", "0"],
            "no_hidden": [*init, "--lambda-hid", "0"],
            "ones": ["--factor-init", "ones"],
            "peft": ["--factor-init", "peft"],
        }[variant]

        def run() -> dict[str, Any]:
            for task in SOURCES:
                self.teach_source(task)
            self.stage(
                "distill", "--tasks", *SOURCES, "--teachers", str(self.teachers), *extra,
                *self.train_args(steps=p.distill_steps, lr=p.distill_lr, seed=0, shots=None, source=True),
                "--out", str(out),
            )  # fmt: skip
            metrics = json.loads((out / "run.json").read_text())["metrics"]
            return {
                "val_loss": metrics["best_val_loss"],
                "source_em": self.score_dir(out, SOURCES),
                "history": _history(out, "distill"),
            }

        self.unit(f"src-distill-{variant}", run)
        return out

    # --- target methods --------------------------------------------------------------------

    def shots(self, k: str) -> int | None:
        return None if k == "full" else int(k)

    def target(
        self, method: str, k: str, seed: int, lr: float, task: str | None, variant: str = "main"
    ) -> dict[str, Any]:
        """Train ``method`` on ``task`` (all targets for mpt_mt) and score it on test."""
        tag = "" if variant == "main" else f"-{variant}"
        key = f"{method}{tag}-k{k}-s{seed}-lr{lr:g}-{task or 'all'}"
        out = self.work / "runs" / key
        steps = self.preset.steps[k] * (self.preset.mt_step_factor if method == "mpt_mt" else 1)
        args = self.train_args(steps=steps, lr=lr, seed=seed, shots=self.shots(k))
        tasks = TARGETS if task is None else [task]

        def run() -> dict[str, Any]:
            if method == "lora":
                assert task is not None
                return self.lora(task, args, out)
            if method in ("pt", "pt_random"):
                init = (
                    ["--init", "text", "--init-text", instruction(task or "")]
                    if method == "pt"
                    else ["--init", "random", "--init-scale", f"{self.embedding_scale():.4f}"]
                )
                self.stage("teach", "--tasks", *tasks, *init, *args, "--out", str(out))
            else:
                source = self.distill(variant)
                mode = {
                    "mpt_factors": [],
                    "mpt_paper": ["--mode", "paper"],
                    "mpt_mt": ["--mode", "multi-target"],
                }[method]
                self.stage(
                    "adapt",
                    "--tasks",
                    *tasks,
                    "--source",
                    str(source),
                    *mode,
                    *args,
                    "--out",
                    str(out),
                )
            metrics = json.loads((out / "run.json").read_text())["metrics"]
            vals = [m["best_val_loss"] for m in metrics.values()]
            return {
                "val_loss": statistics.mean(v for v in vals if v is not None),
                "test": self.score_dir(out, tasks),
                "history": _history(out, None),
            }

        return self.unit(key, run)

    def lora(self, task: str, args: list[str], out: Path) -> dict[str, Any]:
        from trainer.config import parse_options
        from trainer.setup import load_tasks

        opts = parse_options(
            TrainOptions,
            [
                "--model",
                self.model,
                "--data-dir",
                str(self.data),
                "--tasks",
                task,
                "--out",
                str(out),
                *args,
            ],
            "lora",
            "lora",
        )
        data: TaskData = load_tasks(opts, self.backbone)[0]
        tuned, record = train_lora(self.backbone, data, opts, self.preset.lora_rank, out)
        record["test"] = {task: self.exact_match(task, None, backbone=tuned)}
        return record

    def embedding_scale(self) -> float:
        """Half-width of a uniform init with the std of the backbone's token embeddings."""
        table = self.backbone.model.get_input_embeddings().weight  # type: ignore[operator]
        return float(table.detach().float().std()) * 3**0.5

    def baseline(self, method: str) -> dict[str, Any]:
        """none (bare input), text (instruction + input as a chat turn), text_lenient (the
        same, scored by 'the answer contains the target')."""

        def run() -> dict[str, Any]:
            text, lenient = method != "none", method == "text_lenient"
            return {
                "test": {t: self.exact_match(t, None, text=text, lenient=lenient) for t in TARGETS}
            }

        return self.unit(f"{method}-all", run)

    def few_shot_sets(self, k: str, seed: int) -> dict[str, list[str]]:
        """The training inputs a (k, seed) cell sees per target (for the record)."""
        shots = self.shots(k)
        return {
            t: [e.input for e in few_shot(self.examples(t, "train"), shots, seed, t)][:8]
            for t in TARGETS
        }


def _history(out: Path, label: str | None) -> list[dict[str, Any]]:
    """log.jsonl lines (of one run label) with the loss parts, for loss curves."""
    path = out / "log.jsonl"
    if not path.exists():
        return []
    keep = ("run", "step", "loss", "ce", "kl", "hidden_mse", "val_loss")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        {k: r[k] for k in keep if k in r} for r in rows if label is None or r.get("run") == label
    ]


def _brief(result: dict[str, Any]) -> str:
    parts = []
    if result.get("val_loss") is not None:
        parts.append(f"val {result['val_loss']:.3f}")
    if "test" in result:
        parts.append("test " + " ".join(f"{t}={v:.0f}" for t, v in result["test"].items()))
    return ", ".join(parts)
