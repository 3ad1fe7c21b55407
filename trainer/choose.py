"""Choosing a new task's method on held-out examples: the fine-tuning job's search.

A few dozen examples do not say in advance which way of making a task is best: factors over
the served shared prompt (rank 1 or more: a few hundred numbers, composes with the served
prompt), paper mode (the shared prompt trains too: its own shared prompt), or plain prompt
tuning from the user's instruction (Lester et al.'s text init; its own prompt, served as a
shared prompt with ``U = 1, V = 1``). Each candidate is a (method, rank, learning rate); the
search trains them side by side in memory and keeps the better half on validation loss at
every rung (successive halving, Jamieson & Talwalkar 2016) until two are left; those train
the longest and the one with the higher validation exact match (then the lower validation
loss) wins. Every candidate keeps its parameters at its best validation loss (early
stopping: the step count is chosen on validation too, step 0 included). The search's rungs
are short (a third of its budget reaches the winner), so the winner then trains on towards
``final_steps`` (the job's own step count), validated every ``FINAL_EVAL_EVERY`` steps and
stopped once ``FINAL_PATIENCE`` validations in a row did not improve its loss.

Candidates' starting points:
- factors / paper: with an instruction, the factors closest to its text init over the served
  ``P`` (``fit_factors``: ``P ⊙ (U V) ≈ T``, weighted least squares, alternating); without,
  the average of the source tasks' factors (rank > 1: its extra columns start small), or
  ``U V = 1`` when the shared prompt has no source tasks.
- pt: the instruction's token embeddings (text init), else random vocabulary embeddings.

The loop here is the trainer's step (``trainer.loop``'s optimizer, batches, forward and
validation loss) without its files: candidates advance a few steps at a time, alternately,
with a constant learning rate (the horizon is not known in advance).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from prompts import Backbone, SharedPrompt, TaskFactors, identity_factors
from trainer.bank import PromptBank, ones_factors
from trainer.data import Example, MixtureSampler, Tokenized, few_shot, stable_seed, tokenize
from trainer.errors import TrainerError
from trainer.evaluate import predict
from trainer.forward import autocast, collate, cross_entropy, prompted_forward
from trainer.loop import TaskData, make_optimizer, validation_loss
from trainer.metrics import exact_match
from trainer.options import EvaluateOptions, TrainOptions
from trainer.setup import init_prompt

Method = Literal["factors", "paper", "pt"]
METHODS: tuple[Method, ...] = ("factors", "paper", "pt")
# The default grid: every method at two learning rates around what worked before (PT from
# text at 0.03, the demo's teachers; paper mode at 0.1, bench/mpt_real; factors-only at 0.3
# lost to PT in issue 27, so 0.1 and 0.03). A prior: bench/task_quality's lr sweep replaces it.
DEFAULT_LRS: dict[Method, tuple[float, ...]] = {
    "factors": (0.1, 0.03),
    "paper": (0.1, 0.03),
    "pt": (0.1, 0.03),
}
DEFAULT_RANKS = (1, 4)  # factors' ranks tried
MIN_RUNG_STEPS = 2
AUTO_BUDGET_STEPS = 100  # optimizer steps of a whole search when the job does not say
VALID_FRACTION = 0.2  # held out of the training examples when the job has no validation file
MIN_VALID = 4
FINAL_EVAL_EVERY = 5  # the winner's final training: validation every N steps
FINAL_PATIENCE = 3  # ... stopped after this many validations without a better loss

# (kind, fields) → None: progress of the search ("candidate", "rung", "winner")
Report = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Candidate:
    method: Method
    lr: float
    rank: int = 1

    @property
    def name(self) -> str:
        rank = f"-r{self.rank}" if self.method != "pt" else ""
        return f"{self.method}{rank}-lr{self.lr:g}"


@dataclass
class Figures:
    """What validation said about one candidate."""

    candidate: Candidate
    parameters: int
    init: str
    steps: int = 0
    best_step: int = 0
    best_val_loss: float = math.inf
    val_loss_at_0: float | None = None
    val_exact_match: float | None = None  # 0-1, the finalists only
    out_at_rung: int | None = None  # None: a finalist
    final_steps: int = 0  # steps the winner trained after the search

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.candidate.name,
            "method": self.candidate.method,
            "rank": self.candidate.rank,
            "lr": self.candidate.lr,
            "init": self.init,
            "parameters": self.parameters,
            "steps": self.steps,
            "best_step": self.best_step,
            "best_val_loss": _finite(self.best_val_loss),
            "val_loss_at_0": _finite(self.val_loss_at_0),
            "val_exact_match": self.val_exact_match,
            "out_at_rung": self.out_at_rung,
            "final_steps": self.final_steps,
        }


@dataclass
class Choice:
    """The winner's artifacts and every candidate's figures."""

    winner: Figures
    figures: list[Figures]
    shared: SharedPrompt | None  # a new shared prompt (paper, pt), or None (factors)
    task: TaskFactors
    reason: str
    search_steps: int
    seconds: float
    rungs: list[int] = field(default_factory=list)


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 5)


def split_validation(
    examples: list[Any], seed: int, fraction: float = VALID_FRACTION
) -> tuple[list[Any], list[Any]]:
    """(train, validation): a seeded ``fraction`` (at least MIN_VALID) held out for choosing."""
    if len(examples) < 2 * MIN_VALID:
        raise TrainerError(
            f"{len(examples)} training examples are too few to hold some out for choosing; "
            f"give at least {2 * MIN_VALID}, or a validation file"
        )
    order = list(range(len(examples)))
    random.Random(stable_seed(seed, "choose-split")).shuffle(order)
    n_valid = max(MIN_VALID, round(fraction * len(examples)))
    held = set(order[:n_valid])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


def fit_factors(
    shared: Tensor, target: Tensor, rank: int, iterations: int = 50, ridge: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """``U`` [L, r], ``V`` [r, d] minimising ‖P ⊙ (U V) − T‖² (alternating least squares).

    ``trainer.rank_one_fit`` divides by a positive ``P`` of its own; a served ``P`` has entries
    near zero, so this weighs each entry by ``P`` instead of dividing by it."""
    p, t = shared.float(), target.float()
    eye = ridge * torch.eye(rank)
    p2, pt = p * p, p * t
    # start U from the leading singular vectors of the regularised ratio T / P
    ratio = pt / (p2 + p2.mean() * 1e-2)
    left, sing, _ = torch.linalg.svd(ratio, full_matrices=False)
    u = (left[:, :rank] * sing[:rank].sqrt()).contiguous()
    for _ in range(iterations):
        # each column j of V: min_v Σ_i (P_ij u_i·v − T_ij)²
        m = torch.einsum("ij,ir,is->jrs", p2, u, u) + eye  # [d, r, r]
        b = torch.einsum("ij,ir->jr", pt, u)  # [d, r]
        v = torch.linalg.solve(m, b.unsqueeze(-1)).squeeze(-1).T.contiguous()  # [r, d]
        m = torch.einsum("ij,rj,sj->irs", p2, v, v) + eye  # [L, r, r]
        b = torch.einsum("ij,rj->ir", pt, v)  # [L, r]
        u = torch.linalg.solve(m, b.unsqueeze(-1)).squeeze(-1).contiguous()  # [L, r]
    return u, v


def source_factors(
    sources: list[TaskFactors], length: int, dim: int, rank: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The average of the source tasks' factors (``adapt``'s default), widened to ``rank`` with
    small extra columns; ``U V = 1`` without sources."""
    if not sources or len({tf.rank for tf in sources}) != 1:
        return ones_factors(length, dim, rank, 0.01, generator)
    u = torch.stack([tf.u.float() for tf in sources]).mean(0)  # [L, r0]
    v = torch.stack([tf.v.float() for tf in sources]).mean(0)  # [r0, d]
    r0 = u.shape[1]
    if rank <= r0:
        return u[:, :rank].clone(), v[:rank].clone()
    extra = rank - r0
    scale = 0.01 * float(v.abs().mean())
    return (
        torch.cat([u, 0.01 * torch.randn(length, extra, generator=generator)], 1),
        torch.cat([v, scale * torch.randn(extra, dim, generator=generator)], 0),
    )


@dataclass
class Start:
    """Where candidates start: the served shared prompt, its source tasks, the instruction."""

    shared: SharedPrompt
    sources: list[TaskFactors]
    instruction: str | None


def initial_bank(
    cand: Candidate, start: Start, backbone: Backbone, task: str, seed: int, new_shared_id: str
) -> tuple[PromptBank, str]:
    """The candidate's prompt parameters at step 0, and a word on where they start."""
    p = start.shared.prompt.float()
    length, dim = p.shape
    generator = torch.Generator().manual_seed(stable_seed(seed, "choose", cand.name))
    text = (
        init_prompt("text", length, backbone, generator, text=start.instruction)
        if start.instruction
        else None
    )
    if cand.method == "pt":
        if text is not None:
            prompt, init = text, "text"
        else:
            prompt, init = init_prompt("vocab", length, backbone, generator), "vocab"
        u, v = identity_factors(length, dim)
        bank = PromptBank(
            {new_shared_id: prompt},
            {task: (new_shared_id, u, v)},
            train_shared=True,
            train_factors=False,
        )
        return bank, init
    if text is not None:
        u, v = fit_factors(p, text, cand.rank)
        init = "fit to the instruction's text"
    else:
        u, v = source_factors(start.sources, length, dim, cand.rank, generator)
        init = "source average" if start.sources else "ones"
    shared_id = start.shared.id if cand.method == "factors" else new_shared_id
    bank = PromptBank(
        {shared_id: p},
        {task: (shared_id, u, v)},
        train_shared=cand.method == "paper",
        train_factors=True,
    )
    return bank, init


class CandidateRun:
    """One candidate's bank, optimizer and best-on-validation state, advanced step by step."""

    def __init__(
        self,
        cand: Candidate,
        bank: PromptBank,
        init: str,
        data: TaskData,
        backbone: Backbone,
        opts: TrainOptions,
        device: torch.device,
    ) -> None:
        self.cand, self.bank, self.data, self.backbone = cand, bank.to(device), data, backbone
        self.opts, self.device = opts, device
        self.params = bank.trainable()
        self.optimizer = make_optimizer(self.params, opts)
        self.sampler = MixtureSampler([len(data.train)], temperature=1.0, seed=opts.seed)
        self.figures = Figures(cand, sum(p.numel() for p in self.params), init)
        self.best_state = {k: v.detach().clone() for k, v in bank.state_dict().items()}

    def advance(self, steps: int, check: Callable[[float], None]) -> None:
        """``steps`` optimizer steps; ``check(train loss)`` after each (it may raise to stop)."""
        causal = not self.backbone.is_seq2seq
        pad_id = self.backbone.tokenizer.pad_token_id
        for _ in range(steps):
            rows = self.sampler.batch(self.figures.steps, self.opts.batch_size)
            batch = collate(
                [self.data.train[i] for _, i in rows], [0] * len(rows), causal=causal, pad_id=pad_id
            ).to(self.device)
            with autocast(self.device, self.opts.precision):
                loss = cross_entropy(
                    prompted_forward(self.backbone, self.bank(batch.task_index), batch)
                )
            loss.backward()
            if self.opts.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.opts.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.figures.steps += 1
            check(float(loss.detach()))

    def validate(self) -> float:
        loss = validation_loss(self.backbone, self.bank, [self.data], self.opts, self.device)
        value = math.inf if loss is None or not math.isfinite(loss) else loss
        f = self.figures
        if f.val_loss_at_0 is None:
            f.val_loss_at_0 = value
        if value < f.best_val_loss:
            f.best_val_loss, f.best_step = value, f.steps
            self.best_state = {k: v.detach().clone() for k, v in self.bank.state_dict().items()}
        return value

    def restore_best(self) -> None:
        self.bank.load_state_dict(self.best_state)

    def prompt(self) -> Tensor:
        """The task prompt [L, d] at the best validation step, as the server composes it."""
        self.restore_best()
        shared = self.bank.shared[0].detach().float().cpu()
        return shared * (
            self.bank.u[0].detach().float().cpu() @ self.bank.v[0].detach().float().cpu()
        )

    def exact_match(self, rows: list[Tokenized], examples: list[Any], max_new_tokens: int) -> float:
        """Greedy exact match (0-1) of the best prompt on ``rows`` (``examples``' targets)."""
        return prompt_exact_match(self.backbone, self.prompt(), rows, examples, max_new_tokens)


def prompt_exact_match(
    backbone: Backbone, prompt: Tensor, rows: list[Tokenized], examples: list[Any], max_new: int
) -> float:
    opts = EvaluateOptions(model="-", max_new_tokens=max_new, batch_size=16)
    predictions = predict(backbone, prompt, [t.input_ids for t in rows], opts)
    hits = sum(exact_match(p, e.target) for p, e in zip(predictions, examples, strict=True))
    return hits / max(len(examples), 1)


def rung_plan(n: int, budget: int) -> list[int]:
    """Cumulative steps per rung for ``n`` candidates within ``budget`` optimizer steps in all.

    Halving to two finalists: rung i trains ceil(n / 2^i) candidates to s0·2^i steps."""
    if n <= 0:
        return []
    sizes = [n]
    while sizes[-1] > 2:
        sizes.append(math.ceil(sizes[-1] / 2))
    # cost(s0) = Σ_i sizes[i]·(s0·2^i − s0·2^(i−1)), with 2^(−1) read as 0
    unit = sizes[0] + sum(sizes[i] * 2 ** (i - 1) for i in range(1, len(sizes)))
    s0 = max(MIN_RUNG_STEPS, budget // unit)
    return [s0 * 2**i for i in range(len(sizes))]


def choose(
    backbone: Backbone,
    task: str,
    train_rows: list[Tokenized],
    valid_rows: list[Tokenized],
    valid_examples: list[Any],
    start: Start,
    candidates: list[Candidate],
    *,
    budget_steps: int,
    batch_size: int = 8,
    seed: int = 0,
    device: torch.device | None = None,
    check: Callable[[], None] = lambda: None,
    on_step: Callable[[int, int, float], None] | None = None,
    soft_deadline: float | None = None,
    report: Report | None = None,
    new_shared_id: str | None = None,
    final_steps: int = 0,
) -> Choice:
    """Train ``candidates`` by successive halving within ``budget_steps`` optimizer steps; the
    finalists' validation exact match (then loss) picks the winner, which then trains on until
    it has trained ``final_steps`` in all (or its validation loss stops falling). ``check`` may
    raise to stop the job; ``on_step(steps spent, most steps in all, train loss)`` follows
    progress; past ``soft_deadline`` (time.monotonic) the search stops advancing and chooses
    among what it has."""
    if not candidates:
        raise TrainerError("no candidate methods to choose from")
    if not valid_rows:
        raise TrainerError("choosing needs validation examples")
    device = device or torch.device("cpu")
    started = time.monotonic()
    say = report or (lambda kind, fields: None)
    opts = TrainOptions(batch_size=batch_size, eval_limit=None, seed=seed, max_grad_norm=1.0)
    data = TaskData(task, train_rows, valid_rows)
    runs = []
    for cand in candidates:
        torch.manual_seed(stable_seed(seed, "choose-run", cand.name))
        bank, init = initial_bank(cand, start, backbone, task, seed, new_shared_id or task)
        run_opts = TrainOptions(**{**opts.__dict__, "lr": cand.lr})
        runs.append(CandidateRun(cand, bank, init, data, backbone, run_opts, device))
    for r in runs:
        r.validate()
    plan = rung_plan(len(runs), budget_steps)
    alive = list(runs)
    spent = 0
    max_new = max(len(t.target_ids) for t in valid_rows)

    most = budget_steps + max(0, final_steps - (plan[-1] if plan else 0))

    def stepped(loss: float) -> None:
        nonlocal spent
        spent += 1
        if on_step is not None:
            on_step(spent, max(most, spent), loss)
        check()

    for i, target in enumerate(plan):
        for r in alive:
            if soft_deadline is not None and time.monotonic() > soft_deadline:
                break
            r.advance(max(0, target - r.figures.steps), stepped)
            r.validate()
        alive.sort(key=lambda r: r.figures.best_val_loss)
        say(
            "rung",
            {
                "rung": i,
                "steps": target,
                "val_loss": {r.cand.name: _finite(r.figures.best_val_loss) for r in alive},
            },
        )
        if soft_deadline is not None and time.monotonic() > soft_deadline:
            break
        if i < len(plan) - 1:
            keep = math.ceil(len(alive) / 2)
            for r in alive[keep:]:
                r.figures.out_at_rung = i
            alive = alive[:keep]
    finalists = alive[:2]
    for r in alive[2:]:
        r.figures.out_at_rung = len(plan) - 1
    for r in finalists:
        r.figures.val_exact_match = round(r.exact_match(valid_rows, valid_examples, max_new), 4)
    finalists.sort(key=lambda r: (-(r.figures.val_exact_match or 0.0), r.figures.best_val_loss))
    best = finalists[0]
    if final_steps > best.figures.steps and not (
        soft_deadline is not None and time.monotonic() > soft_deadline
    ):
        train_on(best, final_steps, stepped, soft_deadline)
        best.figures.val_exact_match = round(
            best.exact_match(valid_rows, valid_examples, max_new), 4
        )
        say("final", {"name": best.cand.name, "figures": best.figures.as_json()})
    best.restore_best()
    reason = (
        f"{best.cand.name} won: validation exact match {best.figures.val_exact_match:.0%} "
        f"and loss {best.figures.best_val_loss:.4f} (best at step {best.figures.best_step})"
    )
    if len(finalists) > 1:
        other = finalists[1]
        reason += (
            f", vs {other.cand.name}: {other.figures.val_exact_match:.0%}, "
            f"{other.figures.best_val_loss:.4f}"
        )
    reason += f"; {len(runs) - len(finalists)} other candidates were dropped on validation loss"
    if best.figures.final_steps:
        reason += (
            f"; the winner trained {best.figures.final_steps} more steps after the search "
            f"(to step {best.figures.steps}, best at {best.figures.best_step})"
        )
    shared, task_factors = export(best, backbone, task, start)
    figures = [r.figures for r in runs]
    say("winner", {"name": best.cand.name, "reason": reason})
    return Choice(
        best.figures,
        figures,
        shared,
        task_factors,
        reason,
        spent,
        round(time.monotonic() - started, 2),
        plan,
    )


def train_on(
    run: CandidateRun,
    until: int,
    stepped: Callable[[float], None],
    soft_deadline: float | None,
    every: int = FINAL_EVAL_EVERY,
    patience: int = FINAL_PATIENCE,
) -> None:
    """``run`` trains on from its best state (the finalists' exact match restored it) until it
    has trained ``until`` steps in all, validated every ``every`` steps; it stops after
    ``patience`` validations in a row that did not lower its best loss, or past
    ``soft_deadline``. Its best state stays the best seen."""
    f = run.figures
    stale = 0
    while f.steps < until and stale < patience:
        if soft_deadline is not None and time.monotonic() > soft_deadline:
            break
        before = f.best_val_loss
        chunk = min(every, until - f.steps)
        run.advance(chunk, stepped)
        f.final_steps += chunk
        run.validate()
        stale = 0 if f.best_val_loss < before else stale + 1


def export(
    best: CandidateRun, backbone: Backbone, task: str, start: Start
) -> tuple[SharedPrompt | None, TaskFactors]:
    cand = best.cand
    meta = {
        "stage": "choose",
        "method": {"factors": "mpt", "paper": "mpt-paper", "pt": "prompt-tuning"}[cand.method],
        "lr": cand.lr,
        "rank": cand.rank,
        "best_step": best.figures.best_step,
        "init": best.figures.init,
        "source_shared": start.shared.id,
    }
    shared, tasks = best.bank.export(
        backbone.fingerprint, meta, shared_ids=[] if cand.method == "factors" else None
    )
    return (shared[0] if shared else None), tasks[0]


def choose_examples(
    backbone: Backbone,
    task: str,
    train: list[Example],
    validation: list[Example] | None,
    start: Start,
    *,
    candidates: list[Candidate] | None = None,
    budget_steps: int = AUTO_BUDGET_STEPS,
    shots: int | None = None,
    **kwargs: Any,
) -> Choice:
    """The fine-tuning job's search on its examples (the worker and bench/task_quality's
    ``auto`` row both call this): without ``validation``, a seeded part of ``train`` is held
    out (with fewer than 2·MIN_VALID examples, the search validates on ``train`` itself); ``shots`` keeps k training examples (after the hold-out)."""
    seed = int(kwargs.get("seed", 0))
    if validation is None and len(train) < 2 * MIN_VALID:
        validation = train  # too few to hold any out: choose on the training examples
    elif validation is None:
        train, validation = split_validation(train, seed)
    train = few_shot(train, shots, seed, task)
    causal = not backbone.is_seq2seq
    tok = backbone.tokenizer
    rows = tokenize(tok, train, max_input_length=256, max_target_length=32, causal=causal)
    valid_rows = tokenize(
        tok, validation, max_input_length=256, max_target_length=32, causal=causal
    )
    return choose(
        backbone,
        task,
        rows,
        valid_rows,
        validation,
        start,
        candidates or default_candidates(),
        budget_steps=budget_steps,
        **kwargs,
    )


def default_candidates(
    *,
    methods: tuple[Method, ...] = METHODS,
    lr_scale: float = 1.0,
    ranks: tuple[int, ...] = DEFAULT_RANKS,
) -> list[Candidate]:
    """Every method at its own learning rates (× ``lr_scale``); factors at every rank."""
    out = []
    for method in methods:
        for lr in DEFAULT_LRS[method]:
            for rank in ranks if method == "factors" else (1,):
                out.append(Candidate(method, round(lr * lr_scale, 6), rank))
    return out
