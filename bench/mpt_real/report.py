"""Results of the finished units → bench/results/mpt_real.{json,md,png} (+ mpt_real_loss.png).

Cells that are not finished yet are left out (and their seeds counted), so a partial run
writes an honest partial table.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench.common import write_json
from bench.mpt_real.harness import PROMPT_METHODS, Bench
from bench.mpt_real.lora import TARGET_MODULES
from bench.mpt_real.tasks import SOURCES, TARGETS, documentation

SETTINGS = ("8", "32", "full")
ORDER = [
    "none",
    "text",
    "text_lenient",
    "pt",
    "pt_random",
    "mpt_factors",
    "mpt_paper",
    "mpt_mt",
    "lora",
]


def sweep_losses(bench: Bench) -> dict[str, dict[str, float | None]]:
    """Mean validation loss over the targets per method and lr of the sweep cell."""
    p = bench.preset
    out: dict[str, dict[str, float | None]] = {}
    for method in PROMPT_METHODS:
        out[method] = {}
        for lr in p.lrs[method]:
            records = _cell(bench, method, p.sweep_setting, 0, lr)
            vals = [r["val_loss"] for r in records if r and r.get("val_loss") is not None]
            complete = records and all(records)
            out[method][f"{lr:g}"] = statistics.mean(vals) if complete and vals else None
    return out


def choose_lrs(bench: Bench) -> dict[str, float]:
    """Per method, the sweep's lr with the lowest mean validation loss (first lr until known)."""
    chosen = {}
    for method, losses in sweep_losses(bench).items():
        known = {lr: v for lr, v in losses.items() if v is not None}
        best = min(known, key=lambda lr: known[lr]) if known else next(iter(losses))
        chosen[method] = float(best)
    return chosen


def _cell(
    bench: Bench, method: str, k: str, seed: int, lr: float, variant: str = "main"
) -> list[Any]:
    tag = "" if variant == "main" else f"-{variant}"
    if method == "mpt_mt":
        return [bench.record(f"{method}{tag}-k{k}-s{seed}-lr{lr:g}-all")]
    return [bench.record(f"{method}{tag}-k{k}-s{seed}-lr{lr:g}-{t}") for t in TARGETS]


def _scores(records: list[Any]) -> dict[str, float] | None:
    if not records or not all(records):
        return None
    scores: dict[str, float] = {}
    for r in records:
        scores.update(r["test"])
    return scores


def summarize(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    means = [statistics.mean(s[t] for t in TARGETS) for s in per_seed]
    return {
        "mean": round(statistics.mean(means), 2),
        "std": round(statistics.stdev(means), 2) if len(means) > 1 else 0.0,
        "per_task": {t: round(statistics.mean(s[t] for s in per_seed), 2) for t in TARGETS},
        "seeds": len(means),
    }


def collect(bench: Bench, chosen: dict[str, float]) -> dict[str, dict[str, Any]]:
    p = bench.preset
    results: dict[str, dict[str, Any]] = {k: {} for k in SETTINGS}
    for method in ("none", "text", "text_lenient"):
        record = bench.record(f"{method}-all")
        if record:
            for k in SETTINGS:
                results[k][method] = summarize([record["test"]])
    for method in PROMPT_METHODS:
        for k in SETTINGS:
            # the chosen lr; where a cut-short run has not trained that lr here, the sweep
            # point it has (the table's lr column says which)
            for lr in [chosen[method], *p.lrs[method]]:
                per_seed = [
                    s
                    for seed in p.seeds[k]
                    if (s := _scores(_cell(bench, method, k, seed, lr))) is not None
                ]
                if per_seed:
                    results[k][method] = {**summarize(per_seed), "lr": lr}
                    break
    return results


def ablations(bench: Bench, chosen: dict[str, float]) -> dict[str, Any]:
    p = bench.preset
    lr = chosen["mpt_factors"]
    out: dict[str, Any] = {}
    teachers = bench.record("src-teachers-eval")
    if teachers:
        out["teachers"] = {
            "target_mean": None,
            "per_task": None,
            "source_val_loss": statistics.mean(
                r["val_loss"] for t in SOURCES if (r := bench.record(f"src-teach-{t}"))
            ),
            "source_em_mean": round(statistics.mean(teachers["source_em"].values()), 2),
            "source_em": teachers["source_em"],
        }
    for variant in ["main", *p.ablations]:
        scores = _scores(_cell(bench, "mpt_factors", p.sweep_setting, 0, lr, variant))
        source = bench.record(f"src-distill-{variant}")
        if scores is None and source is None:
            continue
        out[variant] = {
            "target_mean": None if scores is None else round(statistics.mean(scores.values()), 2),
            "per_task": scores,
            "source_val_loss": None if source is None else source["val_loss"],
            "source_em_mean": None
            if source is None
            else round(statistics.mean(source["source_em"].values()), 2),
            "source_em": None if source is None else source["source_em"],
        }
    return out


def params_per_task(bench: Bench) -> dict[str, int]:
    p = bench.preset
    L, r, d = p.prompt_length, p.rank, bench.backbone.dim
    lora = sum(
        p.lora_rank * (m.in_features + m.out_features)
        for name, m in bench.backbone.model.named_modules()
        if name.split(".")[-1] in TARGET_MODULES and hasattr(m, "in_features")
    )
    out = {
        "none": 0,
        "text": 0,
        "text_lenient": 0,
        "pt": L * d,
        "pt_random": L * d,
        "mpt_factors": (L + d) * r,
        "mpt_paper": L * d + (L + d) * r,
        "mpt_mt": L * d // len(TARGETS) + (L + d) * r,
    }
    out["lora"] = int(lora)
    return out


def goal(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for k in ("32", "full"):
        res = results[k]
        mpts = {m: v["mean"] for m, v in res.items() if m.startswith("mpt")}
        if "pt" not in res or not mpts:
            lines.append(f"k = {k}: not measured yet.")
            continue
        best = max(mpts, key=lambda m: mpts[m])
        pt = res["pt"]["mean"]
        verdict = "met" if mpts[best] >= pt else "NOT met"
        lines.append(f"k = {k}: best MPT mode {best} {mpts[best]:.1f} vs PT {pt:.1f} → {verdict}.")
        if "mpt_factors" in res:
            gap = pt - res["mpt_factors"]["mean"]
            ok = "met" if gap <= 3 else "NOT met"
            where = f"{gap:.1f} below" if gap > 0 else f"{-gap:.1f} above"
            lines.append(
                f"k = {k}: factors-only {res['mpt_factors']['mean']:.1f}, {where} PT "
                f"(goal: at most 3 below) → {ok}."
            )
    return lines


def backbone_label(model: str) -> str:
    name = Path(model).name
    return f"SmolLM2-135M-Instruct ({name})" if "smollm2" in name.lower() else name


def write_report(bench: Bench, out: Path, command: str, seconds: float) -> None:
    from bench.offline_bench import machine

    chosen = choose_lrs(bench)
    results = collect(bench, chosen)
    report = {
        "backbone": backbone_label(bench.model),
        "results": results,
        "params_per_task": params_per_task(bench),
        "ablations": ablations(bench, chosen),
        "lr_sweep_val_loss": sweep_losses(bench),
        "lr_chosen": chosen,
        "preset": {**vars(bench.preset), "ablations": bench.preset.ablations},
        "goal": goal(results),
        "sources": SOURCES,
        "targets": TARGETS,
        "split_sizes": bench.counts,
        "units_done": len(list(bench.units.glob("*.json"))),
        "unit_seconds": round(
            sum(json.loads(f.read_text())["seconds"] for f in bench.units.glob("*.json")), 1
        ),
        "command": command,
        "machine": machine() + " (torch threads as in the command)",
        "model_path": bench.model,
    }
    write_json(out, "mpt_real", report)
    (out / "mpt_real.md").write_text(markdown(report))
    plot(report, out / "mpt_real.png")
    plot_losses(bench, chosen, out / "mpt_real_loss.png")


def _fmt(v: dict[str, Any] | None) -> str:
    if v is None:
        return "–"
    return f"{v['mean']:.1f} ± {v['std']:.1f}" if v["seeds"] > 1 else f"{v['mean']:.1f}"


def markdown(report: dict[str, Any]) -> str:
    pre = report["preset"]
    res, params = report["results"], report["params_per_task"]
    lines = [
        "# MPT on a real backbone: SmolLM2-135M-Instruct, held-out targets",
        "",
        f"Backbone: `{report['backbone']}` (d = 576, 30 layers, frozen). Preset `{pre['name']}`: "
        f"L = {pre['prompt_length']}, r = {pre['rank']}, batch {pre['batch_size']}, target steps "
        f"{pre['steps']} (multi-target × {pre['mt_step_factor']}), sources: teachers "
        f"{pre['teach_steps']} steps (lr {pre['teach_lr']}), distill {pre['distill_steps']} steps "
        f"(lr {pre['distill_lr']}); validation loss every {pre['eval_every']} steps keeps the best "
        "prompt (steps chosen on validation).",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {report['machine']}. Compute in finished units: "
        f"{report['unit_seconds'] / 60:.1f} min ({report['units_done']} units).",
        "",
        "Score: exact match (%) of the greedy answer's first line on each target's test split "
        f"({pre['sizes']['test']} examples), prompts composed as served. Mean ± std over seeds of "
        "the held-out mean (seeds = few-shot samples and init); `–` = not run yet. The lr "
        "column is the learning rate of the reported cell: the method's chosen lr (lowest "
        "mean validation loss in the sweep below), or, where that lr has not been trained in "
        "this setting yet, the sweep point that has.",
        "",
        "## Goal",
        "",
        *[f"- {g}" for g in report["goal"]],
        "",
    ]
    for k in SETTINGS:
        lines += [
            f"## {'k = ' + k if k != 'full' else 'full data'}",
            "",
            "| method | params/task | lr | seeds | " + " | ".join(TARGETS) + " | mean |",
            "|---|---:|---:|---:|" + "---:|" * (len(TARGETS) + 1),
        ]
        for m in ORDER:
            v = res[k].get(m)
            cells = (
                ["–"] * len(TARGETS) if v is None else [f"{v['per_task'][t]:.1f}" for t in TARGETS]
            )
            lr = "–" if v is None or "lr" not in v else f"{v['lr']:g}"
            seeds = "–" if v is None else str(v["seeds"])
            lines.append(
                f"| {m} | {params.get(m, '–'):,} | {lr} | {seeds} | "
                + " | ".join(cells)
                + f" | {_fmt(v)} |"
                if isinstance(params.get(m), int)
                else f"| {m} | – | {lr} | {seeds} | " + " | ".join(cells) + f" | {_fmt(v)} |"
            )
        lines.append("")
    lines += [
        "![results](mpt_real.png)",
        "",
        f"## Ablations (MPT factors-only, k = {pre['sweep_setting']}, seed 0)",
        "",
        "| source training | target mean | "
        + " | ".join(TARGETS)
        + " | source val loss | source EM mean |",
        "|---|---:|" + "---:|" * len(TARGETS) + "---:|---:|",
    ]
    init = {"ones": "factor init ones (U@V = 1)", "peft": "PEFT factor init (std 0.02)"}
    names = {
        "main": f"MPT: CE + KL + hidden MSE, {init[pre['factor_init']]}",
        "no_distill": "no distillation (decomposition only, CE)",
        "no_hidden": "no hidden-state loss (CE + KL)",
        "teachers": "(the source teachers themselves: text-init PT per source)",
        **init,
    }
    for variant, a in report["ablations"].items():
        cells = (
            ["–"] * len(TARGETS)
            if a["per_task"] is None
            else [f"{a['per_task'][t]:.1f}" for t in TARGETS]
        )
        tm = "–" if a["target_mean"] is None else f"{a['target_mean']:.1f}"
        sv = "–" if a["source_val_loss"] is None else f"{a['source_val_loss']:.3f}"
        se = "–" if a["source_em_mean"] is None else f"{a['source_em_mean']:.1f}"
        lines.append(
            f"| {names.get(variant, variant)} | {tm} | " + " | ".join(cells) + f" | {sv} | {se} |"
        )
    lines += [
        "",
        f"## Learning-rate sweep (mean validation loss over targets, k = {pre['sweep_setting']}, seed 0)",
        "",
        "| method | "
        + " | ".join(f"lr {lr}" for lr in next(iter(report["lr_sweep_val_loss"].values())))
        + " | chosen |",
    ]
    lines.append("|---|" + "---:|" * (len(next(iter(report["lr_sweep_val_loss"].values()))) + 1))
    for m, losses in report["lr_sweep_val_loss"].items():
        cells = ["–" if v is None else f"{v:.3f}" for v in losses.values()]
        picked = (
            f"{report['lr_chosen'][m]:g}" if any(v is not None for v in losses.values()) else "–"
        )
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {picked} |")
    notes = Path(__file__).with_name("NOTES.md")
    lines += [
        "",
        "(LoRA's sweep points are its own learning rates, listed in the preset.)",
        "",
        *([notes.read_text().rstrip(), ""] if notes.exists() else []),
        "",
        "![loss curves](mpt_real_loss.png)",
        "",
        "## Tasks (built offline by `bench/mpt_real/tasks.py`, inputs carry no instruction)",
        "",
        *[f"- {line}" for line in documentation()],
        "",
        f"Split sizes (train = full data / validation / test): {report['split_sizes']}",
        "",
        "Parameters per task: PT L·d; MPT factors-only (L + d)·r; MPT paper L·d + (L + d)·r; "
        "MPT multi-target a quarter of one L·d (one shared prompt for the 4 targets) + (L + d)·r; "
        "LoRA rank 8 on q_proj and v_proj of every layer; none and text train nothing.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    fig, ax = plt.subplots(figsize=(10, 4))
    methods = [m for m in ORDER if any(m in res[k] for k in SETTINGS)]
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for j, k in enumerate(SETTINGS):
            if m in res[k]:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                ys.append(res[k][m]["mean"])
                es.append(res[k][m]["std"])
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=m)
    ax.set_xticks(range(len(SETTINGS)), [f"k = {k}" if k != "full" else "full" for k in SETTINGS])
    ax.set_ylabel("held-out mean exact match (%)")
    ax.set_title(f"{report['backbone']}: held-out targets ({report['preset']['name']} preset)")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(bench: Bench, chosen: dict[str, float], path: Path) -> None:
    """Left: distill loss parts per source variant. Right: target training loss, k = 32 seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in ["main", *bench.preset.ablations]:
        rec = bench.record(f"src-distill-{variant}")
        if rec:
            rows = rec["history"]
            left.plot(
                [r["step"] for r in rows if "ce" in r],
                [r["ce"] for r in rows if "ce" in r],
                label=f"{variant} ce",
            )
            if any("kl" in r for r in rows):
                left.plot(
                    [r["step"] for r in rows if "kl" in r],
                    [r["kl"] for r in rows if "kl" in r],
                    "--",
                    label=f"{variant} kl",
                )
    left.set_title("source training (distill): CE and KL")
    left.set_xlabel("step")
    left.legend(fontsize=7)
    for method in PROMPT_METHODS:
        records = [
            r for r in _cell(bench, method, bench.preset.sweep_setting, 0, chosen[method]) if r
        ]
        curves: dict[int, list[float]] = {}
        for rec in records:
            for row in rec["history"]:
                if row.get("val_loss") is not None:
                    curves.setdefault(row["step"], []).append(row["val_loss"])
        if curves:
            steps = sorted(curves)
            right.plot(steps, [statistics.mean(curves[s]) for s in steps], "o-", label=method)
    right.set_title(f"targets: validation loss (mean over tasks), k = {bench.preset.sweep_setting}")
    right.set_xlabel("step")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
