"""PNG plots: loss curves of a training run and the per-task comparison of methods."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_losses(history: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Training loss (solid) and validation loss (dots) per run label over steps."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, records in history.items():
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if train:
            (line,) = ax.plot(*zip(*train, strict=True), label=f"{label} train")
            if val:
                ax.plot(
                    *zip(*val, strict=True), "o--", color=line.get_color(), label=f"{label} val"
                )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if history:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_methods(scores: dict[str, dict[str, float]], metric: str, path: Path) -> Path:
    """Grouped bars: one group per task, one bar per method, height = ``metric``."""
    methods = list(scores)
    tasks = sorted({t for per_task in scores.values() for t in per_task})
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(len(methods), 1) * 0.5), 4))
    for m, method in enumerate(methods):
        xs = [t + m * width for t in range(len(tasks))]
        ax.bar(xs, [scores[method].get(task, 0.0) for task in tasks], width, label=method)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 100)
    ax.set_title(f"{metric} per task")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
