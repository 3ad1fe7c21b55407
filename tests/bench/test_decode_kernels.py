"""bench/decode_kernels: every kernel computes the same product, and its report is whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import decode_kernels


def test_every_kernel_computes_the_float32_product_to_its_precision() -> None:
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=g) * 0.02 for o, i in decode_kernels.layer_shapes()]
    kernels = decode_kernels.Kernels(weights)
    for n in (1, 3):
        x = torch.randn(n, weights[0].shape[1], generator=g)
        want = torch.nn.functional.linear(x, weights[0])
        for name, product in kernels.products(n).items():
            got = product(0, x).float()
            assert got.shape == want.shape, name
            # bfloat16 / 8-bit: coarser; 4 bits of random weights: half a level of 16
            tol = 1e-4 if name.startswith("f32") else 0.15 if name.startswith("int4") else 5e-2
            rel = float((got - want).norm() / want.norm())
            assert rel < tol, (name, rel)


def test_row_scaling_makes_fbgemm_batch_invariant() -> None:
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(48, 32, generator=g) * 0.02]
    kernels = decode_kernels.Kernels(weights)
    x = torch.randn(4, 32, generator=g)
    x[0] *= 30  # one row's range far beyond the others'
    scaled = kernels.products(4)["int8 W8A8 fbgemm, row-scaled"]
    alone = torch.cat(
        [kernels.products(1)["int8 W8A8 fbgemm, row-scaled"](0, x[j : j + 1]) for j in range(4)]
    )
    assert torch.equal(scaled(0, x), alone)
    batch = kernels.products(4)["int8 W8A8 fbgemm, batch scale"](0, x)
    assert not torch.equal(
        batch[1:],
        torch.cat(
            [
                kernels.products(1)["int8 W8A8 fbgemm, batch scale"](0, x[j : j + 1])
                for j in range(1, 4)
            ]
        ),
    )


def test_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_kernels, "RESULTS", tmp_path)
    assert decode_kernels.main(["--rows", "1", "2", "--repeats", "1", "--layers", "1"]) == 0
    r = json.loads((tmp_path / "decode_kernels.json").read_text())
    assert set(r["ms_per_pass"]["f32 F.linear"]) == {"1", "2"}
    assert set(r["ms_per_pass"]["f32 GEMV"]) == {"1"}  # one row only
    assert r["batch_invariant"] == {
        "int8 W8A8 fbgemm, batch scale": False,
        "int8 W8A8 fbgemm, row-scaled": True,
        "int4 W4A16 (int4pack, Q4_1 blocks)": True,
    }
    assert r["matrices"] == 4 and r["command"].startswith("python -m bench.decode_kernels")
    text = (tmp_path / "decode_kernels.md").read_text()
    assert "| f32 MKL packed (n rows) |" in text and "Extra memory" in text
    assert "| f32 oneDNN packed |" in text
    assert r["relative_error_vs_float32"]["f32 oneDNN packed"] < 1e-5  # float32's numbers
    assert 0.9 < r["extra_bytes_over_float32_weights"]["f32 oneDNN packed"] < 1.5
