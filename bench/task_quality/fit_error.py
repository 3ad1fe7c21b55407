"""How close can factors over a shared prompt start to a text-initialised prompt?

    python -m bench.task_quality.fit_error [--shared DIR_OR_FILE ...] [--ranks 1 2 4 8 16]

For each held-out target's instruction T (its token embeddings, L rows: prompt tuning's text
init) and a shared prompt P (the demo's MPT prompt; before distillation exists, the mean of
the demo's teacher prompts, which is distill's own starting P), the relative error
‖P ⊙ (U V) − T‖ / ‖T‖ of the best rank-r factors (trainer.choose.fit_factors), next to
the source-average start's error and U V = 1's. Seconds of CPU: no training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.mpt_real.tasks import instruction
from bench.task_quality.presets import TARGETS
from prompts import compose_prompt, load_artifact_dir, load_backbone, smollm2_gguf_path
from trainer.choose import fit_factors
from trainer.init_text import text_init_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, required=True, help="artifact folder (shared/, tasks/)")
    ap.add_argument(
        "--id", default=None, help="the shared prompt; default: mean of all in --shared"
    )
    ap.add_argument("--length", type=int, default=16)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    backbone = load_backbone(str(smollm2_gguf_path()), device="cpu")
    found = load_artifact_dir(args.shared)
    if args.id:
        p = found.shared[args.id].prompt.float()
        sources = [tf for tf in found.tasks.values() if tf.shared == args.id]
        what = f"shared prompt {args.id!r}"
    else:
        p = torch.stack([sp.prompt.float() for sp in found.shared.values()]).mean(0)
        sources = []
        what = f"mean of {sorted(found.shared)} (distill's starting P)"
    rows: dict[str, dict[str, float]] = {}
    for target in TARGETS:
        t = text_init_rows(backbone, instruction(target), p.shape[0])
        norm = float(t.norm())
        row = {"ones": float((p - t).norm()) / norm}
        if sources:
            u = torch.stack([tf.u.float() for tf in sources]).mean(0)
            v = torch.stack([tf.v.float() for tf in sources]).mean(0)
            row["source_average"] = float((compose_prompt(p, u, v) - t).norm()) / norm
        for r in args.ranks:
            u, v = fit_factors(p, t, r)
            row[f"fit_r{r}"] = float((compose_prompt(p, u, v) - t).norm()) / norm
        rows[target] = {k: round(x, 3) for k, x in row.items()}
        print(target, rows[target], flush=True)
    out = {
        "P": what,
        "relative_error": rows,
        "command": "python -m bench.task_quality.fit_error " + " ".join(argv or []),
    }
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
