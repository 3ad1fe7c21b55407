"""Stage 4, evaluate: exact match / accuracy / token F1 per task and method, greedy decoding.

A method is an artifact folder (``NAME=DIR``): for each task it holds, the task's prompt is
composed from its blobs exactly as the server does. ``none`` is the bare backbone. Writes
``eval.json``, ``eval.md`` (one table per metric) and ``eval.png`` (exact match per task).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm import tqdm

from prompts import Backbone, compose_prompt, load_artifact_dir
from trainer.data import discover_tasks, load_split, tokenize
from trainer.errors import TrainerError
from trainer.generate import greedy
from trainer.metrics import score
from trainer.options import EvaluateOptions
from trainer.plots import plot_methods
from trainer.setup import check_prompt_fits, start, write_run_json

METRICS = ("exact_match", "accuracy", "f1")


def method_prompts(name: str, path: Path, backbone: Backbone) -> dict[str, Tensor]:
    """Composed prompt [L, d] of every task in the artifact folder."""
    if not path.is_dir():
        raise TrainerError(f"--methods {name}={path}: folder does not exist")
    found = load_artifact_dir(path, backbone=backbone.fingerprint)
    prompts = {}
    for task, factors in found.tasks.items():
        shared = found.shared[factors.shared].prompt.float()
        prompt = compose_prompt(shared, factors.u.float(), factors.v.float())
        check_prompt_fits(prompt, backbone, f"task {task!r} in {path}")
        prompts[task] = prompt
    return prompts


def predict(
    backbone: Backbone, prompt: Tensor | None, inputs: list[list[int]], opts: EvaluateOptions
) -> list[str]:
    texts = []
    for start_ in range(0, len(inputs), opts.batch_size):
        chunk = inputs[start_ : start_ + opts.batch_size]
        prompts = None if prompt is None else prompt[None].expand(len(chunk), -1, -1)
        ids = greedy(backbone, prompts, chunk, opts.max_new_tokens)
        texts += backbone.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [t.strip() for t in texts]


def markdown(results: dict[str, dict[str, dict[str, float]]], tasks: list[str]) -> str:
    lines = []
    for metric in METRICS:
        lines += [
            f"### {metric}",
            "",
            "| method | " + " | ".join(tasks) + " | mean |",
            "|---|" + "---:|" * (len(tasks) + 1),
        ]
        for method, per_task in results.items():
            cells = [per_task.get(t, {}).get(metric) for t in tasks]
            have = [c for c in cells if c is not None]
            mean = f"{sum(have) / len(have):.1f}" if have else "–"
            lines.append(
                f"| {method} | "
                + " | ".join("–" if c is None else f"{c:.1f}" for c in cells)
                + f" | {mean} |"
            )
        lines.append("")
    return "\n".join(lines)


def run(opts: EvaluateOptions) -> int:
    _, backbone = start(opts)
    assert opts.out is not None and opts.data_dir is not None
    tasks = discover_tasks(opts.data_dir, opts.tasks, split=opts.split)
    methods: dict[str, dict[str, Tensor] | None] = {}
    if opts.bare:
        methods["none"] = None
    for spec in opts.methods:
        name, path = spec.split("=", 1)
        methods[name] = method_prompts(name, Path(path), backbone)
    data = {}
    for task in tasks:
        examples = load_split(opts.data_dir, task, opts.split)[: opts.eval_limit]
        tokens = tokenize(
            backbone.tokenizer,
            examples,
            max_input_length=opts.max_input_length,
            max_target_length=opts.max_target_length,
            causal=not backbone.is_seq2seq,
        )
        data[task] = ([t.input_ids for t in tokens], [e.target for e in examples])
    results: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for method in methods:
        results[method], samples[method] = {}, {}
    # a task an artifact set has no prompt for is skipped for it
    pairs = [(m, t) for m, p in methods.items() for t in tasks if p is None or t in p]
    for method, task in tqdm(pairs, desc="evaluate", disable=not opts.progress):
        prompts = methods[method]
        inputs, targets = data[task]
        preds = predict(backbone, None if prompts is None else prompts[task], inputs, opts)
        results[method][task] = {**score(preds, targets), "examples": len(targets)}
        samples[method][task] = [
            {"prediction": p, "target": t} for p, t in zip(preds[:5], targets[:5], strict=False)
        ]
        tqdm.write(
            f"{method:>12} {task:<20} "
            + "  ".join(f"{m}={results[method][task][m]:.1f}" for m in METRICS)
        )
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "eval.json").write_text(
        json.dumps({"split": opts.split, "results": results, "samples": samples}, indent=2) + "\n"
    )
    (opts.out / "eval.md").write_text(
        f"# Evaluation ({opts.split} split, greedy)\n\n" + markdown(results, tasks)
    )
    plot_methods(
        {m: {t: r["exact_match"] for t, r in per.items()} for m, per in results.items()},
        "exact_match",
        opts.out / "eval.png",
    )
    write_run_json(opts.out, "evaluate", opts, backbone, metrics=results)
    print(f"evaluate: {opts.out / 'eval.md'}, eval.json, eval.png")
    return 0
