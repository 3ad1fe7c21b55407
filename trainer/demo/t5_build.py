"""The seq2seq demo (``rankone demo --backbone t5-demo``): a from-scratch byte-level T5.

Built once into its cache: a small byte-level T5 backbone (``pretrain-demo``: 3+3 layers,
d 128, up to 4,000 steps or 6.3 minutes, whichever comes first), the synthetic letter tasks
(``trainer.demo.tasks``), and MPT prompts trained by the trainer (``build_steps``). Each
teacher starts from its task's marker token (``--init-texts``: ``<extra_id_k>``, the input
the backbone was pretrained on, so teachers are near rank one and the closed-form fit is
close to exact). The seq2seq path of rankone keeps a working end-to-end example this way.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from trainer.demo.build_steps import (
    DemoPaths,
    TrainingPlan,
    log,
    read_manifest,
    reset_stale_cache,
    train_prompts,
)
from trainer.demo.tasks import SOURCE_TASKS, write_task_data

BACKBONE = "t5-demo"
# Bump when the recipe changes so that stale caches are rebuilt.
RECIPE_VERSION = 2


@dataclass
class T5Recipe:
    """How the T5 demo is built. Sized for ~8 minutes on two idle CPU cores (+ install: ~10)."""

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
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"backbone": BACKBONE, "version": RECIPE_VERSION, **self.__dict__}


def build_pretrain(paths: DemoPaths, recipe: T5Recipe) -> None:
    from trainer.demo import pretrain

    if (paths.backbone / "pretrain.json").exists():
        log(f"backbone: cached in {paths.backbone}")
        return
    log("step 1/3: pretraining the demo backbone from scratch (a few minutes on CPU)")
    tmp = paths.backbone.with_name("backbone.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    progress = [] if recipe.progress else ["--no-progress"]
    rc = pretrain.main(
        ["--out", str(tmp), "--seed", str(recipe.seed), *recipe.pretrain_args, *progress]
    )
    if rc:
        raise SystemExit("rankone demo: pretrain-demo failed")
    shutil.rmtree(paths.backbone, ignore_errors=True)
    tmp.rename(paths.backbone)


def build_data(paths: DemoPaths, recipe: T5Recipe) -> None:
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


def build_prompts(paths: DemoPaths, recipe: T5Recipe) -> None:
    if paths.manifest.exists() and any((paths.artifacts / "tasks").glob("*.safetensors")):
        log(f"prompts: cached in {paths.artifacts}")
        return
    log("step 3/3: training the MPT prompts (teach, then distill) on the frozen backbone")
    texts = paths.root / "init_texts.json"
    texts.write_text(json.dumps(marker_texts(paths, recipe.tasks), indent=2) + "\n")
    plan = TrainingPlan.from_recipe(
        recipe, str(paths.backbone), max_input_length=256, max_target_length=32
    )
    train_prompts(paths, plan, ["--init-texts", str(texts)])


def build(paths: DemoPaths, recipe: T5Recipe, *, rebuild: bool) -> dict[str, Any]:
    reset_stale_cache(paths, BACKBONE, RECIPE_VERSION, rebuild=rebuild)
    start = time.monotonic()
    build_pretrain(paths, recipe)
    build_data(paths, recipe)
    build_prompts(paths, recipe)
    manifest = read_manifest(paths)
    if manifest is None:
        from trainer.demo.evaluate import evaluate_artifacts

        log("checking the prompts: exact match on the held-out test split (greedy)")
        em = evaluate_artifacts(paths.backbone, paths.artifacts, paths.data, recipe.tasks)
        log("exact match: " + ", ".join(f"{t} {v:.0%}" for t, v in em.items()))
        manifest = {
            "recipe": recipe.to_json(),
            "model": str(paths.backbone.resolve()),
            "build_seconds": round(time.monotonic() - start),
            "test_exact_match": em,
        }
        paths.manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
