"""pretrain-demo from its CLI at tiny sizes, the demo evaluator, and the cheap demo-CLI pieces."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from prompts import (
    compose_prompt,
    identity_factors,
    load_artifact_dir,
    load_backbone,
    save_shared,
    save_task,
)
from prompts.artifacts import SharedPrompt, TaskFactors
from trainer.demo import cli as demo_cli
from trainer.demo import pretrain, t5_build
from trainer.demo.evaluate import evaluate_artifacts, exact_match
from trainer.demo.tasks import SOURCE_TASKS, write_task_data
from trainer.distill import teacher_prompts
from trainer.rank_one_fit import rank_one_fit

TINY = [
    "--steps",
    "3",
    "--minutes",
    "0",
    "--d-model",
    "32",
    "--d-ff",
    "64",
    "--layers",
    "1",
    "--heads",
    "2",
    "--batch-size",
    "4",
    "--eval-examples",
    "2",
    "--threads",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "backbone"
    assert pretrain.main(["--out", str(out), *TINY]) == 0
    return out


def test_pretrain_cli_writes_a_loadable_backbone(tiny_backbone, capsys):
    backbone = load_backbone(tiny_backbone)
    assert backbone.kind == "seq2seq"
    assert backbone.dim == 32
    assert all(not p.requires_grad for p in backbone.model.parameters())
    summary = json.loads((tiny_backbone / "pretrain.json").read_text())
    assert summary["steps"] == 3
    assert set(summary["marker_accuracy"]) == set(SOURCE_TASKS)
    assert len(set(summary["markers"].values())) == len(SOURCE_TASKS)
    ids = backbone.tokenizer("ab").input_ids
    assert ids == [*pretrain.encode_bytes("ab"), pretrain.EOS]


def test_mixture_is_seeded_and_marks_source_tasks():
    cfg = pretrain.PretrainConfig(out="", max_marker=4)
    markers = {name: 259 + k for k, name in enumerate(SOURCE_TASKS)}
    a = pretrain.Mixture(markers, cfg, seed=1).batch(16)
    b = pretrain.Mixture(markers, cfg, seed=1).batch(16)
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = a["input_ids"][:, 0]
    assert all(int(t) in markers.values() or 3 <= int(t) < 259 for t in first)
    assert (a["labels"] != -100).sum() > 0


def test_evaluator_with_identity_prompt(tiny_backbone, tmp_path):
    backbone = load_backbone(tiny_backbone)
    data = tmp_path / "data"
    write_task_data(data, ["upper"], 4, 2, 3, seed=0)
    art = tmp_path / "art"
    prompt = torch.randn(4, backbone.dim)
    u, v = identity_factors(4, backbone.dim)
    save_shared(art, SharedPrompt(id="s", prompt=prompt, backbone=backbone.fingerprint))
    save_task(art, TaskFactors(name="upper", shared="s", u=u, v=v, backbone=backbone.fingerprint))
    with_prompt = evaluate_artifacts(tiny_backbone, art, data, ["upper", "missing"])
    bare = evaluate_artifacts(tiny_backbone, None, data, ["upper"])
    assert set(with_prompt) == {"upper"} and 0.0 <= with_prompt["upper"] <= 1.0
    assert set(bare) == {"upper"}


def test_exact_match():
    assert exact_match(["a", "b ", "c"], ["a", "b", "x"]) == pytest.approx(2 / 3)
    assert exact_match([], []) == 0.0


def test_demo_cli_pieces(tmp_path):
    paths = demo_cli.DemoPaths(tmp_path / "demo")
    recipe = t5_build.T5Recipe(tasks=["upper", "reverse"], n_train=5, n_val=2, n_test=2)
    paths.root.mkdir(parents=True)
    t5_build.build_data(paths, recipe)
    assert (paths.data / "reverse" / "test.jsonl").exists()
    t5_build.build_data(paths, recipe)  # cached: no rewrite, no error
    env = demo_cli.server_env(paths, 8123)
    assert env["RANKONE_PORT"] == "8123"
    assert env["RANKONE_SEED_DIR"].endswith("artifacts")
    assert env["RANKONE_REDIS_URL"] == ""
    text = demo_cli.usage_examples("http://127.0.0.1:8123", "reverse", "abc", ["reverse"])
    assert "curl -s http://127.0.0.1:8123/v1/tasks/reverse/generate" in text
    assert 'model="reverse"' in text
    cmd = demo_cli.trainer_cmd("teach", "--steps", "1")
    assert cmd[1:4] == ["-m", "trainer", "teach"]
    args = demo_cli.build_parser().parse_args(["--no-serve", "--port", "9000"])
    assert args.no_serve and args.port == 9000 and not args.rebuild


def test_rank_one_fit_is_exact_for_marker_like_teachers():
    torch.manual_seed(0)
    rows = torch.randn(3, 1, 16)
    teachers = rows.expand(3, 4, 16) * torch.linspace(0.5, 1.5, 4).view(1, 4, 1)  # rank one
    shared, factors = rank_one_fit(teachers)
    assert shared.shape == (4, 16) and bool((shared > 0).all())
    for k, (u, v) in enumerate(factors):
        assert u.shape == (4, 1) and v.shape == (1, 16)
        assert torch.allclose(compose_prompt(shared, u, v), teachers[k], atol=1e-5)


def test_build_prompts_seeds_distill_with_the_closed_form(tiny_backbone, tmp_path):
    paths = demo_cli.DemoPaths(tmp_path / "demo")
    tasks = ["count", "sort"]
    recipe = t5_build.T5Recipe(
        tasks=tasks,
        n_train=8,
        n_val=2,
        n_test=2,
        teach_steps=1,
        distill_steps=1,
        batch_size=2,
        progress=False,
    )
    paths.root.mkdir(parents=True)
    shutil.copytree(tiny_backbone, paths.backbone)
    t5_build.build_data(paths, recipe)
    assert t5_build.marker_texts(paths, tasks) == {"count": "<extra_id_2>", "sort": "<extra_id_0>"}
    t5_build.build_prompts(paths, recipe)
    backbone = load_backbone(tiny_backbone)
    teachers = teacher_prompts(paths.teach, tasks, backbone)
    marker = backbone.model.get_input_embeddings().weight[261]
    # teacher of "count": its marker's embedding on every row, moved by one small step
    assert (teachers[tasks.index("count")] - marker).abs().max() < 0.05
    art = load_artifact_dir(paths.artifacts)
    assert set(art.tasks) == set(tasks)
    for k, task in enumerate(tasks):
        tf = art.tasks[task]
        student = compose_prompt(art.shared[tf.shared].prompt.float(), tf.u.float(), tf.v.float())
        # one distill step at lr 0.01 from the closed form stays next to the teacher
        assert (student - teachers[k]).abs().max() < 0.1


def test_pretrain_progress_ends_at_100_percent_and_says_why_it_stopped(tmp_path, capsys):
    args = [a for a in TINY if a != "--no-progress"]
    assert pretrain.main(["--out", str(tmp_path / "b"), *args]) == 0
    out, err = capsys.readouterr()
    assert "training for at most 3 steps" in out
    assert "stopped at step 3 (step limit reached)" in out
    assert "100%" in err.splitlines()[-1] or "100%" in err.split("\r")[-1]
