"""The matrix-product kernels a CPU decode step could run, timed on one model's layer shapes.

A decode step of a small model on a CPU is its products: on an Intel Xeon (2 cores) a
one-row float32 step of SmolLM2-135M takes ~28 ms, of which ~4 ms are everything else
(norms, rotary, attention, sampling; measured by stubbing the products out). Which kernel
runs a product therefore decides the step's speed, and PyTorch offers several per precision.
This times one pass over the decoder's 4 x ``layers`` weight matrices (SmolLM2-135M's shapes,
random weights) at each row count with every kernel, interleaved in one run, and records each
kernel's extra memory and its error against the float32 product:

- float32: ``F.linear`` (``x @ Wᵀ``), weight-major ``W @ xᵀ``, ``torch.mv`` (one row),
  MKL's packed GEMM (``torch.ops.mkl._mkl_linear``, what inductor's freezing uses), packed
  for one row and for the row count itself, and oneDNN's packed GEMM
  (``torch.ops.mkldnn._linear_pointwise``; ``RANKONE_WEIGHTS=float32-packed`` takes the faster
  of the two packings);
- bfloat16: weight-major, ``torch.mv``, and oneDNN's prepacked weights
  (``torch.ops.mkldnn._linear_pointwise``);
- 8-bit weights: ``torch._weight_int8pack_mm`` with bfloat16 activations (W8A16, what
  ``RANKONE_WEIGHTS=int8`` runs), and fbgemm's dynamically quantized linear (W8A8,
  ``torch.ops.quantized.linear_dynamic``) as it is (one scale for the whole batch: a row's
  numbers then depend on the other rows) and with each row scaled to [-1, 1] first (a fixed
  quantization: batch-invariant, as rankone's mixed batches must be);
- 4-bit weights: ``torch._weight_int4pack_mm_for_cpu`` with bfloat16 activations, blocks of 32
  in llama.cpp's Q4_1 form (what ``RANKONE_WEIGHTS=int4`` runs; its error here is the random
  weights' quantization: on a Q4_1 file's weights the copy is exact).

    python -m bench.decode_kernels [--rows 1 2 4 8 16 32] [--threads 2] [--repeats 7]

Writes bench/results/decode_kernels.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.common import RESULTS, write_json
from bench.engine_bench import machine
from bench.weights_quality import cpu_matrix_flags
from service.engine.forward import fastest  # the engine's own timing of its choices
from service.engine.fused_llama import Int4Weight, PackedWeight, Products

# SmolLM2-135M: hidden 576, intermediate 1536, 9 query and 3 key/value heads of 64, 30 layers
HIDDEN, INTER, Q_OUT, KV_OUT, LAYERS = 576, 1536, 576, 192, 30


def layer_shapes(hidden: int = HIDDEN, inter: int = INTER) -> list[tuple[int, int]]:
    """One decoder layer's fused matrices [out, in]: q/k/v, o, gate/up, down."""
    return [(Q_OUT + 2 * KV_OUT, hidden), (hidden, Q_OUT), (2 * inter, hidden), (hidden, inter)]


def _row_scaled(x: Tensor, packed: Any) -> Tensor:
    """fbgemm's W8A8 product with each row scaled to [-1, 1] and a row holding -1 and 1 added:
    the batch's quantization range is then always [-1, 1], whatever the other rows hold."""
    scale = x.abs().amax(1, keepdim=True).clamp_min(1e-30)
    edge = x.new_zeros(1, x.shape[1])
    edge[0, 0], edge[0, 1] = 1.0, -1.0
    y = torch.ops.quantized.linear_dynamic(torch.cat([x / scale, edge]), packed, False)
    return y[:-1] * scale


class Kernels:
    """Every kernel's prepared weights for one set of matrices, and how to run a product."""

    def __init__(self, weights: list[Tensor]) -> None:
        self.f32 = weights
        self.bf16 = [w.to(torch.bfloat16) for w in weights]
        self.dnn_bf16 = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in self.bf16]
        # what RANKONE_WEIGHTS=float32-packed copies where oneDNN's packing is the faster one
        self.dnn_f32 = [
            torch.ops.mkldnn._reorder_linear_weight(w, PackedWeight.PACKED_FOR) for w in self.f32
        ]
        self.int8, self.int8_scale, self.fbgemm = [], [], []
        with warnings.catch_warnings():  # quantized tensors are deprecated; the kernels are not
            warnings.simplefilter("ignore")
            for w in weights:
                scale = (w.abs().amax(1) / 127.0).clamp_min(1e-12)
                self.int8.append(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
                self.int8_scale.append(scale.to(torch.bfloat16))
                zero = torch.zeros(w.shape[0], dtype=torch.long)
                q = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
                self.fbgemm.append(torch.ops.quantized.linear_prepack(q, None))
        self.int4 = [Int4Weight.of(w) for w in weights]
        self.mkl: dict[int, list[Tensor]] = {}

    def mkl_packed(self, rows: int) -> list[Tensor]:
        """The float32 weights packed by MKL for ``rows`` rows (kept: packing takes seconds)."""
        if rows not in self.mkl:
            self.mkl[rows] = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in self.f32]
        return self.mkl[rows]

    def products(self, n: int) -> dict[str, Callable[[int, Tensor], Tensor]]:
        """name -> product(i, x) of matrix ``i`` with float32 rows ``x`` [n, in]: [n, out]."""
        mkl1, mkl_n = self.mkl_packed(1), self.mkl_packed(n)
        out: dict[str, Callable[[int, Tensor], Tensor]] = {
            "f32 F.linear": lambda i, x: F.linear(x, self.f32[i]),
            "f32 weight-major": lambda i, x: torch.mm(self.f32[i], x.t()).t(),
            "f32 MKL packed (1 row)": lambda i, x: torch.ops.mkl._mkl_linear(
                x, mkl1[i], self.f32[i], None, n
            ),
            "f32 MKL packed (n rows)": lambda i, x: torch.ops.mkl._mkl_linear(
                x, mkl_n[i], self.f32[i], None, n
            ),
            "f32 oneDNN packed": lambda i, x: torch.ops.mkldnn._linear_pointwise(
                x, self.dnn_f32[i], None, "none", [], ""
            ),
            "bf16 weight-major": lambda i, x: torch.mm(self.bf16[i], x.bfloat16().t()).t(),
            "bf16 oneDNN prepacked": lambda i, x: torch.ops.mkldnn._linear_pointwise(
                x.bfloat16(), self.dnn_bf16[i], None, "none", [], ""
            ),
            "int8 W8A16 (int8pack)": lambda i, x: torch._weight_int8pack_mm(
                x.bfloat16(), self.int8[i], self.int8_scale[i]
            ),
            "int4 W4A16 (int4pack, Q4_1 blocks)": lambda i, x: self.int4[i].product(x, Products()),
            "int8 W8A8 fbgemm, batch scale": lambda i, x: torch.ops.quantized.linear_dynamic(
                x, self.fbgemm[i], False
            ),
            "int8 W8A8 fbgemm, row-scaled": lambda i, x: _row_scaled(x, self.fbgemm[i]),
        }
        if n == 1:
            out["f32 GEMV"] = lambda i, x: torch.mv(self.f32[i], x[0])[None]
            out["bf16 GEMV"] = lambda i, x: torch.mv(self.bf16[i], x[0].bfloat16())[None]
        return out


def measure(rows: list[int], repeats: int, layers: int = LAYERS) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(o, i, generator=g) * 0.02 for _ in range(layers) for o, i in layer_shapes()
    ]
    kernels = Kernels(weights)
    ms: dict[str, dict[str, float]] = {}
    error: dict[str, float] = {}
    batch_invariant: dict[str, bool] = {}
    for n in rows:
        xs = {d: torch.randn(n, d, generator=g) for d in {w.shape[1] for w in weights}}
        if n > 1:  # one row far larger than the others, as real activations have
            xs = {d: torch.cat([x[:1] * 30, x[1:]]) for d, x in xs.items()}
        funcs = kernels.products(n)
        timed: dict[str, list[float]] = {k: [] for k in funcs}
        for _ in range(3):  # interleaved rounds: every kernel, then again
            for name, fn in funcs.items():

                def one_pass(
                    fn: Callable[[int, Tensor], Tensor] = fn, xs: dict[int, Tensor] = xs
                ) -> None:
                    for i, w in enumerate(weights):
                        fn(i, xs[w.shape[1]])

                timed[name].append(fastest(one_pass, repeats))
        for name, t in timed.items():
            ms.setdefault(name, {})[str(n)] = round(statistics.median(t) * 1e3, 2)
        # error of the gate/up product against float32, worst row (relative norm)
        i, x = 2, xs[weights[2].shape[1]]
        want = F.linear(x, weights[i])
        for name, fn in funcs.items():
            got = fn(i, x).float()
            err = float(((got - want).norm(dim=1) / want.norm(dim=1)).max())
            error[name] = max(error.get(name, 0.0), err)
            if n > 1:
                alone = torch.cat([fn(i, x[j : j + 1]) for j in range(n)]).float()
                same = torch.equal(alone, got) if "fbgemm" in name or "int4" in name else None
                if same is not None:
                    batch_invariant[name] = batch_invariant.get(name, True) and same
        print(f"rows {n}: " + ", ".join(f"{k} {ms[k][str(n)]}" for k in timed), flush=True)
    f32_bytes = sum(w.numel() * 4 for w in weights)
    memory = {
        "f32 MKL packed (per packing)": sum(
            int(torch.ops.mkldnn._nbytes(p)) for p in kernels.mkl_packed(1)
        )
        / f32_bytes,
        "f32 oneDNN packed": sum(int(torch.ops.mkldnn._nbytes(p)) for p in kernels.dnn_f32)
        / f32_bytes,
        "bf16 oneDNN prepacked": sum(int(torch.ops.mkldnn._nbytes(p)) for p in kernels.dnn_bf16)
        / f32_bytes,
    }
    return {
        "ms_per_pass": ms,
        "relative_error_vs_float32": {k: round(v, 5) for k, v in error.items()},
        "batch_invariant": batch_invariant,
        "extra_bytes_over_float32_weights": {k: round(v, 2) for k, v in memory.items()},
        "matrices": len(weights),
        "weights_mb_float32": round(f32_bytes / 1e6, 1),
    }


def report(r: dict[str, Any]) -> str:
    ms = r["ms_per_pass"]
    rows = list(next(iter(ms.values())))
    lines = [
        "# Decode-step product kernels on this CPU",
        "",
        f"Command: `{r['command']}` — {r['measured']}",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in r["machine"].items()),
        "",
        f"CPU matrix flags: {', '.join(r['cpu_flags']) or 'none found'}.",
        "",
        f"One pass over {r['matrices']} matrices of SmolLM2-135M's decoder shapes (random weights, "
        f"{r['weights_mb_float32']} MB in float32; a step adds the lm_head and ~4 ms of other "
        "operators at one row), ms, median of 3 interleaved rounds of the fastest of "
        f"{r['repeats']}; error: worst row's relative error of the gate/up product against "
        "float32, one row 30x the others' scale.",
        "",
        "| kernel | " + " | ".join(f"{n} rows" for n in rows) + " | rel. error |",
        "|---|" + "---:|" * (len(rows) + 1),
    ]
    for name, by in ms.items():
        cells = [str(by.get(n, "")) for n in rows]
        err = r["relative_error_vs_float32"].get(name, "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {err} |")
    lines += [
        "",
        "Extra memory over the float32 weights: "
        + ", ".join(f"{k} {v}x" for k, v in r["extra_bytes_over_float32_weights"].items())
        + ". Batch-invariant (a row's numbers alone = in a batch): "
        + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in r["batch_invariant"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--out", default="decode_kernels", help="report name under bench/results")
    args = ap.parse_args(argv)
    if not torch.backends.mkldnn.is_available() or not torch._C.has_mkl:
        print("decode_kernels: this torch build lacks MKL or oneDNN", file=sys.stderr)
        return 3
    torch.set_num_threads(args.threads)
    r = measure(args.rows, args.repeats, args.layers)
    r.update(
        command=" ".join(["python -m bench.decode_kernels", *(argv or sys.argv[1:])]),
        measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=machine(),
        cpu_flags=cpu_matrix_flags(),
        repeats=args.repeats,
    )
    write_json(RESULTS, args.out, r)
    (RESULTS / f"{args.out}.md").write_text(report(r))
    print(report(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
