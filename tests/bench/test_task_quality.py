"""bench/task_quality's smoke preset end to end on the tiny GPT-2: the lr sweep, the seeds at
the chosen lr, the auto row through trainer.choose, the report's shape, and resuming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.task_quality.__main__ import Bench, main
from prompts import SharedPrompt, TaskFactors
from prompts import load_backbone as _load
from prompts.artifacts import save_shared, save_task


def test_smoke_preset_runs_reports_and_resumes(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bb = _load(tiny_gpt2_dir)
    g = torch.Generator().manual_seed(0)
    source = tmp_path / "artifacts"
    save_shared(source, SharedPrompt("mpt", torch.randn(4, bb.dim, generator=g), bb.fingerprint))
    for name in ("a", "b"):
        u, v = torch.ones(4, 1), 1 + 0.1 * torch.randn(1, bb.dim, generator=g)
        save_task(source, TaskFactors(name, "mpt", u, v, bb.fingerprint))
    state = tmp_path / "state"
    argv = ["--preset", "smoke", "--state", str(state), "--source", str(source)]
    argv += ["--model", str(tiny_gpt2_dir)]
    assert main([*argv, "--max-units", "3"]) == 0
    partial = json.loads((state / "task_quality_smoke.json").read_text())
    assert partial["partial"] and partial["units_done"] == 3
    assert partial["verdict"] == {}  # no target has every method's run yet
    assert main(argv) == 0
    r = json.loads((state / "task_quality_smoke.json").read_text())
    assert not r["partial"] and r["units_done"] == r["units_total"]
    assert set(r["k"]) == {"32", "8"} and set(r["k"]["32"]) == {
        "auto",
        "by_val",
        "pt",
        "mpt_factors",
        "mpt_factors_r4",
    }
    # by_val, recomputed from the runs: per target and seed the method with the lowest
    # validation loss (k = 32's seed 0: the sweep's run at the chosen lr)
    methods = ("pt", "mpt_factors", "mpt_factors_r4")
    for k in ("32", "8"):
        for t in ("capital", "person"):
            picked, ems = [], []
            for seed in (0, 1):
                if k == "32" and seed == 0:
                    lr = {m: r["chosen_lr"][m][t] for m in methods}
                    runs = {m: r["units"][f"sweep-{m}-{t}-k32-s0-lr{lr[m]:g}"] for m in methods}
                else:
                    runs = {m: r["units"][f"seed-{m}-{t}-k{k}-s{seed}"] for m in methods}
                best = min(methods, key=lambda m: runs[m]["best_val_loss"])
                picked.append(best)
                ems.append(runs[best]["test_em"])
            assert r["by_val_choices"][k][t] == picked
            assert r["k"][k]["by_val"]["per_task"][t] == round(sum(ems) / 2, 2)
    for k in ("32", "8"):
        for row in r["k"][k].values():
            assert row["seeds_complete"] == 2 and row["std"] is not None
            assert set(row["per_task"]) == {"capital", "person"}
    assert all(lr in (0.1, 0.01) for per in r["chosen_lr"].values() for lr in per.values())
    assert r["params_per_task"]["mpt_factors"] == 4 + bb.dim
    assert all(len(c) == 2 for per in r["auto_choices"].values() for c in per.values())
    assert "| auto |" in (state / "task_quality_smoke.md").read_text()
    for k, v in r["verdict"].items():  # the goals, computed from the same table
        rows = r["k"][k]
        assert v["targets"] == ["capital", "person"] and set(v["seeds"].values()) == {2}
        assert v["mean"] == {m: row["mean"] for m, row in rows.items()}
        best = max(("pt", "mpt_factors", "mpt_factors_r4"), key=lambda m: rows[m]["mean"])
        assert v["best_single"] != "by_val"  # a selection rule, not a method
        assert v["best_single"] == best
        assert v["auto_minus_best_single"] == round(rows["auto"]["mean"] - rows[best]["mean"], 2)
        assert set(v["auto_minus_target_best"]) == {"capital", "person"}
        assert v["best_mpt"] in ("mpt_factors", "mpt_factors_r4")
    assert "## The goals, on what is done so far" in (state / "task_quality_smoke.md").read_text()

    # the horizon check: each method at its swept lr, longer; the sweep's runs read, not redone
    from bench.task_quality import horizon

    out = tmp_path / "horizon"
    hargv = ["--preset", "smoke", "--steps", "4", "--sweep-state", str(state)]
    hargv += ["--state", str(tmp_path / "hstate"), "--out", str(out), "--source", str(source)]
    assert horizon.main([*hargv, "--model", str(tiny_gpt2_dir)]) == 0
    h = json.loads((out / "task_quality_horizon.json").read_text())
    assert set(h["methods"]) == {"pt", "mpt_factors", "mpt_factors_r4"} and h["steps"] == [2, 4]
    for method, row in h["methods"].items():
        assert row["lr"] == r["chosen_lr"][method]["capital"]
        assert row["steps_4"]["steps"] == 4 and row["steps_2"]["steps"] == 2
    assert "| pt |" in (out / "task_quality_horizon.md").read_text()

    # a new machine (no state) continues from the report's units: nothing is trained again
    assert set(r["units"]) and all(
        u["source_sha"] == r["source"]["sha256_16"] for u in r["units"].values()
    )
    shutil.rmtree(state / "units")

    def no_training(*args: Any) -> Any:
        raise AssertionError("a unit the report carries was trained again")

    with monkeypatch.context() as m:
        m.setattr(Bench, "run_method", no_training)
        m.setattr(Bench, "run_auto", no_training)
        assert main(argv) == 0
    again = json.loads((state / "task_quality_smoke.json").read_text())
    assert again["k"] == r["k"] and not again["partial"]

    # units trained against another source build are not taken
    shutil.rmtree(state / "units")
    save_shared(source, SharedPrompt("mpt", torch.randn(4, bb.dim, generator=g), bb.fingerprint))
    assert main([*argv, "--max-units", "1"]) == 0
    other = json.loads((state / "task_quality_smoke.json").read_text())
    assert other["units_done"] == 1 and other["source"]["sha256_16"] != r["source"]["sha256_16"]
    # but kept in the report, and taken when asked to: the report counts runs per source build
    assert set(other["units_other_source"]) == set(r["units"]) - set(other["units"])
    assert main([*argv, "--any-source"]) == 0
    mixed = json.loads((state / "task_quality_smoke.json").read_text())
    assert not mixed["partial"] and mixed["source"]["builds"] == {
        other["source"]["sha256_16"]: 1,
        r["source"]["sha256_16"]: mixed["units_done"] - 1,
    }


def test_units_run_auto_right_after_each_targets_sweep() -> None:
    """A target's sweep is followed by auto on the same rows, so a session that finishes a
    target can compare auto with every method; no unit is planned twice."""
    from bench.task_quality.__main__ import Bench
    from bench.task_quality.presets import PRESETS

    bench = Bench.__new__(Bench)  # the plan needs the preset only
    bench.preset = PRESETS["cpu"]
    keys = [key for key, _, _ in bench.units()]
    assert len(keys) == len(set(keys))
    per_target = len(bench.preset.methods) * len(bench.preset.lrs)
    first = bench.preset.targets[0]
    assert keys[per_target] == f"auto-{first}-k32-s0"
    assert all(k.startswith("sweep-") and f"-{first}-" in k for k in keys[:per_target])
    seeds, ks, targets = bench.preset.seeds, bench.preset.ks, bench.preset.targets
    assert sum(k.startswith("auto-") for k in keys) == len(seeds) * len(ks) * len(targets)
    # after the sweeps, seed by seed: k = 8's seed 0 comes before any seed 1
    later = keys[len(targets) * (per_target + 1) :]
    seed_of = [int(key.rsplit("-s", 1)[1]) for key in later]
    assert seed_of == sorted(seed_of)
    assert all("-k8-" in key for key, seed in zip(later, seed_of, strict=True) if seed == 0)


def test_a_unit_claimed_by_a_live_process_is_left_to_it(tmp_path: Path) -> None:
    """Several processes share a state directory: a unit claimed by a live process is not run
    again; a claim whose process died is taken over; a finished unit frees its claim."""
    import subprocess
    import sys

    from bench.task_quality.presets import PRESETS

    bench = Bench.__new__(Bench)  # the plan and the state directory only
    bench.preset, bench.state = PRESETS["smoke"], tmp_path
    (tmp_path / "units").mkdir()
    first, second = (key for key, _, _ in bench.units()[:2])
    ran: list[str] = []
    bench.do = lambda key, fn, *args: ran.append(key) or {}  # type: ignore[method-assign]
    bench.report = lambda command: {}  # type: ignore[method-assign]
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        bench.unit_path(first).with_suffix(".claim").write_text(str(alive.pid))
        bench.unit_path(second).with_suffix(".claim").write_text(str(dead.pid))
        done, elsewhere = bench.one_pass("cmd", max_units=1)
        assert (done, elsewhere, ran) == (1, True, [second])
        assert not bench.unit_path(second).with_suffix(".claim").exists()
        assert bench.unit_path(first).with_suffix(".claim").read_text() == str(alive.pid)
    finally:
        alive.kill()
        alive.wait()
    # its process gone, the first unit's claim is taken over too
    assert bench.one_pass("cmd", max_units=1) == (1, False) and ran == [second, first]
