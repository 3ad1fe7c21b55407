"""One fine-tuning job on the worker: the server's files → a data folder → ``adapt`` → a task.

The job's files become ``<tmp>/data/<task>/{train,validation}.jsonl`` and the shared prompt
(with the registered tasks over it, whose factors' average is where adaptation starts, as
``rankone train adapt --source`` does) becomes ``<tmp>/source/``: from there it is the trainer's
own adapt stage, on the backbone the worker keeps loaded. Progress goes to the server through
the step hook, which also stops the run (cancel, lost lease, time limit, shutdown).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from client import Client
from client.errors import APIError, TransportError
from prompts import (
    Backbone,
    compose_prompt,
    encode_shared,
    encode_task,
    from_base64,
    load_artifact_dir,
    to_base64,
)
from trainer.data import read_jsonl, tokenize
from trainer.distributed import init_distributed
from trainer.errors import TrainerError
from trainer.evaluate import predict
from trainer.metrics import score
from trainer.options import AdaptOptions, EvaluateOptions

log = logging.getLogger("rankone.worker")
MAX_SOURCE_TASKS = 64  # source tasks averaged into the starting factors
PROGRESS_EVERY_S = 1.0


class JobStopped(Exception):
    """The job must stop: ``reason`` is cancelled/lease_lost, time_limit or shutdown."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Limits:
    max_steps: int
    max_examples: int
    max_job_s: float


@dataclass
class JobControl:
    """Shared by the training thread and the lease keeper: why (if) the job must stop."""

    deadline: float
    stop_reason: tuple[str, str] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stop(self, reason: str, message: str) -> None:
        with self.lock:
            self.stop_reason = self.stop_reason or (reason, message)

    def check(self) -> None:
        if self.stop_reason is not None:
            raise JobStopped(*self.stop_reason)
        if time.monotonic() > self.deadline:
            raise JobStopped("time_limit", "the job ran past its time limit")


def finite(value: Any) -> float | None:
    """A float the server accepts (JSON has no NaN/inf): None for a diverged loss."""
    return float(value) if value is not None and math.isfinite(float(value)) else None


def write_examples(content: bytes, path: Path) -> int:
    """The server-validated JSONL as the task's split file (input/target or chat lines, both
    read by the trainer); returns the number of examples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return sum(1 for line in content.splitlines() if line.strip())


def write_source(client: Client, claim: dict[str, Any], root: Path) -> bool:
    """The shared prompt and up to MAX_SOURCE_TASKS of its source tasks: the registered tasks
    over it that no fine-tuning job made (as ``--source`` is distill's output, not earlier
    adaptations). True if any was found."""
    job = claim["job"]
    shared_id, own = job["model"], job["rankone"]["task"]
    (root / "shared").mkdir(parents=True)
    (root / "shared" / f"{shared_id}.safetensors").write_bytes(from_base64(claim["shared_prompt"]))
    (root / "tasks").mkdir()
    found = 0
    for task in client.tasks.list():
        if found >= MAX_SOURCE_TASKS:
            break
        if task.shared != shared_id or task.name == own or "fine_tuning_job" in task.metadata:
            continue
        full = client.tasks.get(task.name, include_factors=True)
        if full.factors:
            blob = from_base64(full.factors)
            (root / "tasks" / f"{task.name}.safetensors").write_bytes(blob)
            found += 1
    return found > 0


def validation_accuracy(backbone: Backbone, out: Path, data: Path, task: str) -> float | None:
    """Exact match (0-1) of the trained task on (up to 100) validation examples, greedy, with
    as many new tokens as the longest validation target needs (decoding is the costly part)."""
    path = data / task / "validation.jsonl"
    if not path.exists():
        return None
    examples = read_jsonl(path)[:100]
    found = load_artifact_dir(out, backbone=backbone.fingerprint)
    tf = found.tasks[task]
    prompt = compose_prompt(found.shared[tf.shared].prompt.float(), tf.u.float(), tf.v.float())
    tokens = tokenize(
        backbone.tokenizer,
        examples,
        max_input_length=256,
        max_target_length=32,
        causal=not backbone.is_seq2seq,
    )
    longest = max(len(t.target_ids) for t in tokens)  # EOS included
    opts = EvaluateOptions(model="-", data_dir=data, out=out, max_new_tokens=longest, batch_size=16)
    predictions = predict(backbone, prompt, [t.input_ids for t in tokens], opts)
    return score(predictions, [e.target for e in examples])["exact_match"] / 100


class JobRun:
    """Runs one claimed job to its end: result, failure, or stopped (cancelled/lease lost)."""

    def __init__(
        self,
        client: Client,
        backbone: Backbone,
        claim: dict[str, Any],
        *,
        device: str,
        limits: Limits,
    ) -> None:
        self.client, self.backbone, self.claim = client, backbone, claim
        self.job: dict[str, Any] = claim["job"]
        self.token: str = claim["lease_token"]
        self.device, self.limits = device, limits
        timeout = min(float(self.job["rankone"]["timeout_s"]), limits.max_job_s)
        self.control = JobControl(deadline=time.monotonic() + timeout)
        self._pending: list[dict[str, Any]] = []
        self._last_post = 0.0
        self._search_spent = 0  # search steps spent so far (all candidates together)

    # ---- progress ------------------------------------------------------------------------

    def _post(self, force: bool = False) -> None:
        if not self._pending or (
            not force and time.monotonic() - self._last_post < PROGRESS_EVERY_S
        ):
            return
        events, self._pending = self._pending, []
        try:
            self.client.fine_tuning.worker.progress(self.job["id"], self.token, events)
        except APIError as e:
            if e.status == 409:
                self.control.stop("lease_lost", e.message)
        except TransportError as e:
            log.warning("could not post progress of %s: %s", self.job["id"], e)
        self._last_post = time.monotonic()

    def on_step(self, step: int, record: dict[str, Any] | None) -> None:
        if record is not None:
            event = {"step": step, "total_steps": self.job["rankone"]["steps"]}
            for key, name in (("loss", "train_loss"), ("val_loss", "valid_loss")):
                if finite(record.get(key)) is not None:
                    event[name] = finite(record[key])
            self._pending.append(event)
            self._post(force="valid_loss" in event)
        self.control.check()

    # ---- the job ---------------------------------------------------------------------------

    def options(self, data: Path, source: Path, out: Path, has_source: bool) -> AdaptOptions:
        state, hp = self.job["rankone"], self.job["hyperparameters"]
        if state["steps"] > self.limits.max_steps:
            raise TrainerError(
                f"the job asks for {state['steps']} steps; this worker runs at most {self.limits.max_steps}"
            )
        return AdaptOptions(
            model=self.backbone.name,
            data_dir=data,
            tasks=[state["task"]],
            out=out,
            source=source,
            shared_id=self.job["model"],
            mode=state["mode"],
            shots=state["shots"],
            seed=int(self.job["seed"]),
            steps=int(state["steps"]),
            batch_size=int(hp["batch_size"]),
            lr=float(state["learning_rate"]),
            eval_every=int(state["eval_every"]),
            log_every=max(1, int(state["steps"]) // 50),
            # over a source: fit to the job's instruction where it gives one, else the average
            factor_init="auto" if has_source else "ones",
            init_text=state.get("instruction") if has_source else None,
            device=self.device,
            progress=False,
        )

    def report(self, kind: str, fields: dict[str, Any]) -> None:
        """The search's progress as job events (trainer.choose)."""
        event: dict[str, Any] = {"step": self._search_spent}
        if kind == "rung":
            losses = ", ".join(f"{k} {v}" for k, v in fields["val_loss"].items())
            event["message"] = (
                f"search rung {fields['rung']}, {fields['steps']} steps each: valid loss {losses}"
            )
            # the chart's validation series: the best candidate's loss after this rung
            best = [v for v in map(finite, fields["val_loss"].values()) if v is not None]
            if best:
                event["valid_loss"] = min(best)
        elif kind == "final":
            fig = fields["figures"]
            event["message"] = (
                f"search: the winner {fields['name']} trained {fig['final_steps']} more steps, to "
                f"step {fig['steps']}: best valid loss {fig['best_val_loss']} at step "
                f"{fig['best_step']}, valid exact match {fig['val_exact_match']:.0%}"
            )
            if finite(fig["best_val_loss"]) is not None:
                event["valid_loss"] = finite(fig["best_val_loss"])
        else:
            event["message"] = f"search: {fields['reason']}"
        event["message"] = event["message"][:2000]
        self._pending.append(event)
        self._post(force=True)

    def on_search_step(self, spent: int, budget: int, loss: float) -> None:
        self._search_spent = spent
        event: dict[str, Any] = {"step": spent, "total_steps": max(budget, spent)}
        if finite(loss) is not None:
            event["train_loss"] = finite(loss)
        self._pending.append(event)
        self._post()

    def search(self, tmp: Path) -> tuple[str, str | None, dict[str, Any]]:
        """Modes auto, paper, prompt-tuning: ``trainer.choose`` picks method, lr and steps on
        held-out examples; returns (task blob, own shared-prompt blob or None, metrics)."""
        from trainer.choose import METHODS, Start, choose_examples, default_candidates

        job, state = self.job, self.job["rankone"]
        task, files = state["task"], self.client.files
        n = write_examples(files.content(job["training_file"]), tmp / "train.jsonl")
        if n > self.limits.max_examples:
            raise TrainerError(
                f"{n} training examples; this worker takes at most {self.limits.max_examples}"
            )
        validation = None
        if job["validation_file"]:
            write_examples(files.content(job["validation_file"]), tmp / "validation.jsonl")
            validation = read_jsonl(tmp / "validation.jsonl")
        if state["steps"] > self.limits.max_steps:
            raise TrainerError(
                f"the job asks for {state['steps']} steps; this worker runs at most {self.limits.max_steps}"
            )
        write_source(self.client, self.claim, tmp / "source")
        found = load_artifact_dir(tmp / "source", backbone=self.backbone.fingerprint)
        shared = found.shared[job["model"]]
        sources = [tf for tf in found.tasks.values() if tf.shared == shared.id]
        methods = {"auto": METHODS, "paper": ("paper",), "prompt-tuning": ("pt",)}[state["mode"]]
        lr_scale = float(job["hyperparameters"]["learning_rate_multiplier"])
        started = time.monotonic()
        soft = started + 0.8 * max(0.0, self.control.deadline - started)
        choice = choose_examples(
            self.backbone,
            task,
            read_jsonl(tmp / "train.jsonl"),
            validation,
            Start(shared, sources[:MAX_SOURCE_TASKS], state.get("instruction")),
            candidates=default_candidates(methods=methods, lr_scale=lr_scale),
            budget_steps=int(state["steps"]),
            final_steps=int(state["steps"]),  # the winner trains on to the job's step count
            shots=state["shots"],
            batch_size=int(job["hyperparameters"]["batch_size"]),
            seed=int(job["seed"]),
            device=torch.device(self.device if self.device != "auto" else "cpu"),
            check=self.control.check,
            on_step=self.on_search_step,
            soft_deadline=soft,
            report=self.report,
            new_shared_id=f"{task[:56]}-prompt",
        )
        self._post(force=True)
        win = choice.winner
        metrics: dict[str, Any] = {
            "method": win.candidate.method,
            "candidate": win.candidate.name,
            "learning_rate": win.candidate.lr,
            "rank": win.candidate.rank,
            "steps": win.best_step,
            "search_steps": choice.search_steps,
            "final_steps": win.final_steps,
            "train_seconds": round(time.monotonic() - started, 2),
            "best_val_loss": finite(win.best_val_loss),
            "valid_accuracy": win.val_exact_match,
            "trained_parameters": win.parameters,
            "factor_init": win.init,
            "choice": choice.reason[:2000],
            "candidates": json.dumps([f.as_json() for f in choice.figures]),
        }
        for f in choice.figures[: 64 - len(metrics)]:
            metrics[f"valid_loss:{f.candidate.name}"] = finite(f.best_val_loss)
        own = None if choice.shared is None else to_base64(encode_shared(choice.shared))
        return to_base64(encode_task(choice.task)), own, metrics

    def train(self, tmp: Path) -> tuple[str, dict[str, Any]]:
        from trainer.adapt import adapt

        job, task = self.job, self.job["rankone"]["task"]
        data, source, out = tmp / "data", tmp / "source", tmp / "out"
        files = self.client.files
        n = write_examples(files.content(job["training_file"]), data / task / "train.jsonl")
        if n > self.limits.max_examples:
            raise TrainerError(
                f"{n} training examples; this worker takes at most {self.limits.max_examples}"
            )
        if job["validation_file"]:
            valid = files.content(job["validation_file"])
            write_examples(valid, data / task / "validation.jsonl")
        has_source = write_source(self.client, self.claim, source)
        opts = self.options(data, source, out, has_source)
        torch.manual_seed(opts.seed)
        started = time.monotonic()
        adapt(opts, init_distributed(self.device), self.backbone, on_step=self.on_step)
        self._post(force=True)
        run = json.loads((out / "run.json").read_text())
        metrics = next(iter(run["metrics"].values()))
        accuracy = validation_accuracy(self.backbone, out, data, task)
        result: dict[str, Any] = {
            "steps": opts.steps,
            "train_seconds": round(time.monotonic() - started, 2),
            "best_val_loss": finite(metrics["best_val_loss"]),
            "final_val_loss": finite(metrics["final_val_loss"]),
            "trained_parameters": metrics["trained_parameters"],
            "valid_accuracy": accuracy,
            "factor_init": opts.factor_init,
        }
        blob = (out / "tasks" / f"{task}.safetensors").read_bytes()
        return to_base64(blob), result

    def run(self) -> str:
        """Train and report; returns the job's outcome as this worker saw it."""
        job_id = self.job["id"]
        worker = self.client.fine_tuning.worker
        try:
            own: str | None = None
            with tempfile.TemporaryDirectory(prefix=f"rankone-{job_id}-") as tmp:
                if self.job["rankone"]["mode"] == "factors-only":
                    factors, metrics = self.train(Path(tmp))
                else:
                    factors, own, metrics = self.search(Path(tmp))
            self.control.check()
            worker.result(job_id, self.token, factors, metrics, shared_prompt=own)
            return "succeeded"
        except JobStopped as e:
            if e.reason == "time_limit":
                worker.failure(job_id, self.token, str(e), code="time_limit")
                return "failed"
            log.info("job %s stopped: %s", job_id, e)
            return e.reason
        except TrainerError as e:
            worker.failure(job_id, self.token, str(e), code="invalid_training_data")
            return "failed"
        except APIError as e:
            if e.status == 409:  # the lease went to someone else, or the job was cancelled
                log.info("job %s: %s", job_id, e.message)
                return "lease_lost"
            raise
