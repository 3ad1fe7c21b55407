"""rankone's own CPU products (``one_row``: ``rankone_cpu::one_row`` and
``one_row_q4``): built here, they compute ``x @ wᵀ`` for float32 and bfloat16 matrices of any
row count (four rows at a time, then the rest) and 1 to 8 rows of activations, and for 4-bit
copies in tiles of 64 rows, refuse what they do not cover with a message, and say why not where
they cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.engine import one_row
from service.engine.fused_llama import Int4Weight


@pytest.fixture(scope="module")
def kernels() -> None:
    why = one_row.load()
    if why is not None:  # a CPU without AVX-512: the compiled step keeps its reductions
        pytest.skip(why)


@pytest.mark.parametrize(("n", "d"), [(1, 32), (3, 64), (4, 64), (5, 96), (97, 576), (260, 1536)])
def test_float32_products(kernels: None, n: int, d: int) -> None:
    g = torch.Generator().manual_seed(n * d)
    w, x = torch.randn(n, d, generator=g), torch.randn(1, d, generator=g)
    y = one_row.product(x, w)
    assert y.shape == (1, n) and y.dtype == torch.float32
    exact = (x.double() @ w.double().t()).float()
    bound = 1e-6 * float((x.abs().double() @ w.abs().double().t()).max()) * 4
    torch.testing.assert_close(y, exact, rtol=0, atol=bound)
    for r in range(n):  # each row alone: rows are independent of their group of four
        torch.testing.assert_close(one_row.product(x, w[r : r + 1].contiguous()), y[:, r : r + 1])


@pytest.mark.parametrize(("n", "d"), [(1, 32), (7, 64), (97, 576), (130, 1536)])
def test_bfloat16_products_round_the_row_first(kernels: None, n: int, d: int) -> None:
    """A bfloat16 copy's product: ``x`` rounded to bfloat16 (as torch casts), float32 sums (so
    equal, to float32 rounding, to the float64 product of the rounded operands)."""
    g = torch.Generator().manual_seed(n + d)
    w = torch.randn(n, d, generator=g).to(torch.bfloat16)
    x = torch.randn(1, d, generator=g)
    y = one_row.product(x, w)
    exact = (x.to(torch.bfloat16).double() @ w.double().t()).float()
    bound = 1e-6 * float((x.abs().double() @ w.abs().double().t()).max()) * 4
    torch.testing.assert_close(y, exact, rtol=0, atol=bound)
    unrounded = (x.double() @ w.double().t()).float()  # the row's rounding is visible
    assert not torch.allclose(y, unrounded, rtol=0, atol=bound)


def test_what_the_kernels_refuse(kernels: None) -> None:
    w = torch.randn(8, 64)
    with pytest.raises(RuntimeError, match="1 to 8 float32 rows"):
        one_row.product(torch.randn(9, 64), w)
    with pytest.raises(RuntimeError, match="1 to 8 float32 rows"):
        one_row.product(torch.randn(0, 64), w)
    with pytest.raises(RuntimeError, match="contiguous"):
        one_row.product(torch.randn(1, 64), torch.randn(64, 8).t())
    with pytest.raises(RuntimeError, match="multiple of 32"):
        one_row.product(torch.randn(1, 48), torch.randn(8, 48))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        one_row.product(torch.randn(1, 64), w.double())
    assert one_row.fits(w) and one_row.fits(w.to(torch.bfloat16))
    assert not one_row.fits(torch.randn(8, 48))  # rows not whole multiples of 32
    assert not one_row.fits(torch.randn(64, 8).t())
    assert not one_row.fits(w.half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "d"), [(5, 64), (97, 576), (130, 1536)])
def test_several_rows_read_the_weights_once_each_row_as_alone(
    kernels: None, dtype: torch.dtype, n: int, d: int
) -> None:
    """1 to 8 rows of activations in one call (in chunks of 8, 4, 2, 1 sharing each pass over
    the weights): every row's products are the bits it gets alone, within float32 rounding of
    the float64 product of the (rounded) row and the weights."""
    g = torch.Generator().manual_seed(n + d)
    w = torch.randn(n, d, generator=g).to(dtype)
    x = torch.randn(one_row.MAX_ROWS, d, generator=g)
    alone = torch.cat([one_row.product(x[j : j + 1], w) for j in range(len(x))])
    row = x if dtype == torch.float32 else x.to(torch.bfloat16)
    exact = (row.double() @ w.double().t()).float()
    bound = 4e-6 * float((x.abs().double() @ w.abs().double().t()).max())
    torch.testing.assert_close(alone, exact, rtol=0, atol=bound)
    for m in range(1, one_row.MAX_ROWS + 1):
        y = one_row.product(x[:m], w)
        assert y.shape == (m, n) and torch.equal(y, alone[:m]), m


@pytest.fixture(scope="module")
def q4_kernel(kernels: None) -> None:
    if not one_row.has_q4():  # AVX-512 without AVX512-BF16: torch's int4 kernel instead
        pytest.skip("the 4-bit one-row kernel needs AVX512-BF16")


@pytest.mark.parametrize(("n", "d"), [(64, 32), (128, 96), (960, 576), (576, 1536)])
def test_4_bit_products_round_the_row_first(q4_kernel: None, n: int, d: int) -> None:
    """A 4-bit copy's product from the kernel's tiles: ``x`` rounded to bfloat16, float32 sums
    of the copy's own weights (its levels times their scales plus their offsets), so within
    float32 rounding of the float64 product; torch's int4 kernel (bfloat16 out) within its own
    output's rounding of it."""
    g = torch.Generator().manual_seed(n + d)
    copy = Int4Weight.of(torch.randn(n, d, generator=g))
    tiles, scales = one_row.q4_tiles(copy.quanta(), copy.scales_zeros)
    assert tiles.shape == (n // 64, d * 32) and tiles.dtype == torch.uint8
    assert scales.shape == (n // 64, d // 32, 64, 2) and scales.dtype == torch.bfloat16
    levels = copy.levels()
    x = torch.randn(1, d, generator=g)
    y = one_row.product_q4(x, tiles, scales)
    assert y.shape == (1, n) and y.dtype == torch.float32
    exact = (x.to(torch.bfloat16).double() @ levels.double().t()).float()
    # the kernel sums (16 + q) x and takes 24 s sum(x) back out: float32 rounding of terms up
    # to ~3x the weights' own
    bound = 1e-5 * float((x.abs().double() @ levels.abs().double().t()).max())
    torch.testing.assert_close(y, exact, rtol=0, atol=bound)
    unrounded = (x.double() @ levels.double().t()).float()  # the row's rounding is visible
    assert not torch.allclose(y, unrounded, rtol=0, atol=bound)
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), copy.packed, 32, copy.scales_zeros
    )
    scale = float(exact.abs().max())
    torch.testing.assert_close(y, theirs.float(), rtol=0, atol=4 * 2**-8 * scale)
    # each tile's rows alone: a tile is its 64 rows' levels and scales
    for t in range(n // 64):
        alone = one_row.product_q4(x, tiles[t : t + 1], scales[t : t + 1])
        assert torch.equal(alone, y[:, 64 * t : 64 * (t + 1)])


def test_what_the_4_bit_kernel_refuses(q4_kernel: None) -> None:
    copy = Int4Weight.of(torch.randn(128, 64))
    tiles, scales = one_row.q4_tiles(copy.quanta(), copy.scales_zeros)
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="one float32 row"):
        one_row.product_q4(torch.randn(2, 64), tiles, scales)
    with pytest.raises(RuntimeError, match="scales must be"):
        one_row.product_q4(torch.randn(1, 96), tiles, scales)  # d is the scales' groups
    with pytest.raises(RuntimeError, match="scales must be"):
        one_row.product_q4(x, tiles, scales.float())
    with pytest.raises(RuntimeError, match="tiles must be"):
        one_row.product_q4(x, tiles[:1], scales)
    with pytest.raises(RuntimeError, match="tiles must be"):
        one_row.product_q4(x, tiles.to(torch.int32), scales)
    assert one_row.fits_q4((960, 576)) and one_row.fits_q4((64, 32))
    assert not one_row.fits_q4((48, 576))  # rows: whole tiles of 64
    assert not one_row.fits_q4((64, 48))  # columns: whole groups of 32
    assert not one_row.fits_q4((64, one_row.MAX_WIDTH + 32))


def test_which_cpus_build_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert one_row.isa_flags(frozenset({"sse4_2", "avx2", "fma"})) is None
    avx512 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"})
    plain = one_row.isa_flags(avx512)
    assert plain is not None and "-mavx512bf16" not in plain
    bf16 = one_row.isa_flags(avx512 | {"avx512_bf16"})
    assert bf16 is not None and "-mavx512bf16" in bf16
    # one library per kind of CPU, in the directory asked for
    assert one_row.library(plain, tmp_path) != one_row.library(bf16, tmp_path)
    assert one_row.library(plain, tmp_path).parent == tmp_path
    # a compiler that fails: the error says so, and nothing half-written is left
    monkeypatch.setenv("CXX", "false")
    target = tmp_path / "k.so"
    with pytest.raises(RuntimeError, match="false failed"):
        one_row._build(target, plain)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def shipped(kernels: None, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """``prebuild``'s folder: this CPU's kind copied from the cache (built already), the other
    kind (with or without AVX512-BF16) compiled by ``prebuild``."""
    folder = tmp_path_factory.mktemp("prebuilt")
    here = one_row.library(one_row._isa() or [])
    shutil.copy(here, folder / here.name)
    built = one_row.prebuild(folder)
    assert len(set(built)) == 2 and all(p.parent == folder and p.exists() for p in built)
    assert folder / here.name in built
    return built


def _run(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_prebuilt_kernels_load_where_no_compiler_is(shipped: list[Path], tmp_path: Path) -> None:
    """A process whose cache holds no kernels and which has no compiler loads them from the
    prebuilt folder (``PREBUILT``: the Docker image's case), and without them says why."""
    load = "from pathlib import Path; from service.engine import one_row; "
    load += "one_row.PREBUILT = Path({!r}); print(one_row.load() or 'loaded')"
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "CXX": "/bin/false"}
    assert _run(load.format(str(shipped[0].parent)), **env) == "loaded"
    refused = _run(load.format(str(tmp_path / "none")), **env)
    assert refused.startswith("one-row kernels not built: RuntimeError: /bin/false failed")


def test_the_kernels_without_avx512_bf16(shipped: list[Path]) -> None:
    """The build for AVX-512 CPUs without AVX512-BF16 (bfloat16 weights widened to float32),
    run in a process of its own (one library per process registers the operator): its products
    are the float64 products of the rounded row and the weights; its 4-bit operator refuses to
    run (``has_q4`` is false there)."""
    isa = one_row.isa_flags(frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}))
    assert isa is not None and "-mavx512bf16" not in isa
    target = one_row.library(isa, shipped[0].parent)
    assert target in shipped
    check = f"""
import torch
torch.ops.load_library({str(target)!r})
g = torch.Generator().manual_seed(0)
for n, d in ((1, 32), (7, 64), (97, 576)):
    x = torch.randn(1, d, generator=g)
    for w in (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g).bfloat16()):
        y = torch.ops.rankone_cpu.one_row(x, w)
        row = x if w.dtype == torch.float32 else x.bfloat16()
        exact = (row.double() @ w.double().t()).float()
        bound = 4e-6 * float((x.abs().double() @ w.abs().double().t()).max())
        torch.testing.assert_close(y, exact, rtol=0, atol=bound)
tiles, scales = torch.zeros(1, 32 * 32, dtype=torch.uint8), torch.zeros(1, 1, 64, 2).bfloat16()
try:
    torch.ops.rankone_cpu.one_row_q4(torch.randn(1, 32), tiles, scales)
except RuntimeError as e:
    assert "built without AVX512-BF16" in str(e), e
else:
    raise AssertionError("the 4-bit kernel ran without AVX512-BF16")
print("ok")
"""
    assert _run(check) == "ok"
