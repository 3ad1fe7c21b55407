"""One-row (and few-row) matrix products for the compiled decode steps on a CPU with AVX-512.

A decode step with one running request reads every weight once for one row of activations,
and the compiled one-row step (``compiled_step``) ran each such product as a reduction that
inductor writes as one loop per output row with a single vector accumulator: each addition
waits on the one before it, so the loop runs at the adder's latency, not the memory's rate
(~26 GB/s of bfloat16 weights on an Intel Xeon whose cores read ~50 GB/s). ``one_row.cpp``
computes four output rows per pass over the input, each with its own accumulator, fetching the
next four rows' lines meanwhile, and bfloat16 weights by ``vdpbf16ps`` where the CPU has
AVX512-BF16: the compiled one-row step calls it as one operator per product
(``rankone_cpu::one_row``), the graph fusing what lies between them. Measured on that Xeon
(SmolLM2, 2 threads, the step alone): against the reductions, in alternation in one process,
a one-row ``bfloat16`` step 13.3-17.0 ms → 8.9-13.2 ms and ``float32`` 22.0-23.4 → 17.5-18.8
ms without the prefetching; the prefetching then took them (alternating processes) from
10.7-11.1 to 7.0-7.4 ms and from 17.6-17.9 to 15.6-16.5 ms (docs/internals.md).

The same kernel takes up to ``MAX_ROWS`` (8) rows of activations, reading the weights once for
all of them (four weight rows by up to four activation rows per pass, two by eight), each row's
sums in the same order as alone: the fused forward runs every float32 and bfloat16 product of up
to 8 rows with it, eager or compiled (``fused_llama.Products.kernel``). Over SmolLM2's decoder
matrices
(Intel Xeon, alternating in one process) it took 11-15 ms for 2 and 4 bfloat16 rows where
oneDNN's prepacked GEMM took 27-32, 15-20 ms for 8 against 18-28; float32 19-26 ms for 2-8 rows
against torch's GEMM's 23-56.

4-bit copies (``Int4Weight``, llama.cpp's Q4_1 form) have a kernel of their own where the CPU
has AVX512-BF16 (``rankone_cpu::one_row_q4``): the copy's levels in tiles of 64 rows
(``q4_tiles``), each level made the bfloat16 number 16 + q by two bit operations and summed by
``vdpbf16ps``, one float32 lane per row. Over SmolLM2's 120 4-bit matrices (same process,
alternating) a pass took 3.0-4.6 ms against torch's int4 kernel's 4.8-6.3 ms; inside the
compiled one-row step 36 µs a product against 45 (``torch.profiler``, 30 steps each).

Built here, once per machine (the C++ compiler inductor needs; ~15 s) into inductor's cache
directory (``TORCHINDUCTOR_CACHE_DIR``), named by a hash of the source, the CPU's instruction
sets used and torch's version; loaded once per process. An image without a compiler ships them
built: ``python -m service.engine.one_row --prebuild`` builds both kinds (AVX-512, and with
AVX512-BF16) into ``PREBUILT``, inside the package, where ``load`` looks first (the Docker
image's builder stage runs it). ``load`` says why not where it cannot
be (no AVX-512, no compiler, a failed build): the forward then keeps the BLAS's products and
the compiled one-row step inductor's reductions.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("rankone.engine")

SOURCE = Path(__file__).with_name("csrc") / "one_row.cpp"
# kernels built ahead of time, shipped in the package (``prebuild``): looked for before the cache
PREBUILT = SOURCE.with_name("prebuilt")
# what the kernels use: AVX-512 (F, BW, VL, DQ) and FMA; AVX512-BF16 where the CPU has it
_NEEDED = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma")
MAX_WIDTH = 8192  # the longest row the kernels take (one_row.cpp's kMaxWidth)
MAX_ROWS = 8  # the most rows of activations one call of ``product`` takes (kMaxInputs)
Q4_TILE, Q4_GROUP = 64, 32  # the 4-bit kernel's rows per tile and columns per scale


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's instruction-set flags (``cpuinfo``'s flags line; empty where it cannot be
    read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def isa_flags(flags: frozenset[str]) -> list[str] | None:
    """The compiler's instruction-set options for a CPU with ``flags``; None without AVX-512."""
    if not all(f in flags for f in _NEEDED):
        return None
    options = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    return options + (["-mavx512bf16"] if "avx512_bf16" in flags else [])


@functools.cache
def _isa() -> list[str] | None:
    """This CPU's instruction-set options for the kernels (``isa_flags``), read once."""
    return isa_flags(cpu_flags())


def _cache_dir() -> Path:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return Path(cache_dir()) / "rankone"
    except Exception:  # another torch: inductor's default place
        return Path(tempfile.gettempdir()) / "torchinductor_rankone"


def _build(target: Path, isa: list[str]) -> None:
    """Compile ``SOURCE`` into the shared library ``target`` (atomically: a temporary file
    renamed, so that processes building at once never load half a file)."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX)")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        compiler,
        str(SOURCE),
        "-shared",
        "-fPIC",
        "-O3",
        "-std=c++17",
        "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *isa,
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        *(f"-L{p}" for p in cpp_extension.library_paths()),
        "-lc10",
        "-ltorch_cpu",
        "-ltorch",
    ]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        done = subprocess.run(
            [*command, "-o", str(partial)], capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-800:]}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def library(isa: list[str], directory: Path | None = None) -> Path:
    """Where the kernels built with ``isa`` live: named by a hash of the source, ``isa`` and
    torch's version (a new torch or source builds anew; another CPU kind builds its own)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(isa).encode(), torch.__version__.encode()]))
    return (directory or _cache_dir()) / f"one_row_{key.hexdigest()[:20]}.so"


@functools.cache
def load() -> str | None:
    """Build (where not built yet) and load the kernels, once per process: None when
    ``rankone_cpu::one_row`` is there, else why not (the caller keeps its reductions)."""
    if not sys.platform.startswith("linux"):
        return "one-row kernels are built on Linux only"
    isa = _isa()
    if isa is None:
        return "one-row kernels need a CPU with AVX-512 (F, BW, VL, DQ) and FMA"
    target = library(isa, PREBUILT)
    if not target.exists():
        target = library(isa)
    try:
        if not target.exists():
            _build(target, isa)
        torch.ops.load_library(str(target))
        torch.library.register_fake("rankone_cpu::one_row")(_one_row_shape)
        torch.library.register_fake("rankone_cpu::one_row_q4")(_one_row_q4_shape)
    except Exception as exc:  # no compiler, a failed build or load: say why, keep reductions
        return f"one-row kernels not built: {type(exc).__name__}: {exc}"[:1000]
    log.info("one-row kernels loaded (%s)", "vdpbf16ps" if "-mavx512bf16" in isa else "fma")
    return None


def _one_row_shape(x: Tensor, w: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))


def _one_row_q4_shape(x: Tensor, tiles: Tensor, scales: Tensor) -> Tensor:
    return x.new_empty((1, scales.shape[0] * Q4_TILE))


def fits(w: Tensor) -> bool:
    """Whether ``w`` has a one-row kernel: a contiguous float32 or bfloat16 CPU matrix whose
    rows are whole multiples of 32 (at most ``MAX_WIDTH`` long)."""
    return (
        w.dim() == 2
        and w.device.type == "cpu"
        and w.dtype in (torch.float32, torch.bfloat16)
        and w.is_contiguous()
        and w.shape[1] % 32 == 0
        and w.shape[1] <= MAX_WIDTH
    )


def product(x: Tensor, w: Tensor) -> Tensor:
    """``x @ wᵀ`` for 1 to ``MAX_ROWS`` float32 rows ``x`` [m, d]: [m, N] float32 (bfloat16
    ``w``: ``x`` rounded to bfloat16 first, float32 sums), the weights read once; each row's
    numbers the same bits whatever rows are beside it. Needs ``load()`` to have returned
    None."""
    return torch.ops.rankone_cpu.one_row(x, w)


@functools.cache
def has_q4() -> bool:
    """Whether the loaded kernels include the 4-bit one (``one_row_q4``: AVX512-BF16)."""
    isa = _isa()
    return load() is None and isa is not None and "-mavx512bf16" in isa


def fits_q4(shape: tuple[int, int]) -> bool:
    """Whether a 4-bit copy of an [N, d] matrix has a one-row kernel: N whole tiles of 64
    rows, d whole groups of 32 columns (at most ``MAX_WIDTH``)."""
    n, d = shape
    return n % Q4_TILE == 0 and d % Q4_GROUP == 0 and 0 < d <= MAX_WIDTH


def q4_tiles(levels: Tensor, scales_zeros: Tensor) -> tuple[Tensor, Tensor]:
    """The 4-bit kernel's layout (one_row.cpp) of a copy whose levels are ``levels`` [N, d]
    (0 .. 15) and whose (s, z) per group of 32 columns are ``scales_zeros`` [d / 32, N, 2]
    bfloat16: its tiles [N / 64, d * 32] uint8 and scales [N / 64, d / 32, 64, 2]."""
    n, d = levels.shape
    # [tile, block of 16 rows, row, step of 8 columns, nibble, column of the pair]
    q = levels.to(torch.uint8).reshape(n // Q4_TILE, 4, 16, d // 8, 4, 2)
    q = q.permute(0, 3, 1, 2, 5, 4)  # [tile, step, block, row, column of the pair, nibble]
    words = torch.stack([q[..., 0] | (q[..., 1] << 4), q[..., 2] | (q[..., 3] << 4)], -1)
    tiles = words.reshape(n // Q4_TILE, d * 32).contiguous()  # (little-endian 16-bit words)
    sz = scales_zeros.reshape(d // Q4_GROUP, n // Q4_TILE, Q4_TILE, 2).permute(1, 0, 2, 3)
    return tiles, sz.to(torch.bfloat16).contiguous()


def product_q4(x: Tensor, tiles: Tensor, scales: Tensor) -> Tensor:
    """``x @ wᵀ`` for one float32 row ``x`` [1, d] and a 4-bit copy in ``q4_tiles``' layout:
    [1, N] float32 (``x`` rounded to bfloat16 first, float32 sums). Needs ``has_q4()``."""
    return torch.ops.rankone_cpu.one_row_q4(x, tiles, scales)


def prebuild(directory: Path = PREBUILT) -> list[Path]:
    """Build the kernels for both kinds of AVX-512 CPU (with and without AVX512-BF16) into
    ``directory``, for a machine or image that has no compiler at run time: ``load`` finds them
    there (by the same names: this torch and this source). Whatever CPU builds them."""
    built = []
    for extra in ((), ("avx512_bf16",)):
        isa = isa_flags(frozenset(_NEEDED) | set(extra))
        assert isa is not None
        target = library(isa, directory)
        if not target.exists():
            _build(target, isa)
        built.append(target)
    return built


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="rankone's CPU kernels, built ahead of time")
    ap.add_argument("--prebuild", type=Path, nargs="?", const=PREBUILT, required=True)
    for path in prebuild(ap.parse_args().prebuild):
        print(path)
