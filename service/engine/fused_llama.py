"""A lean forward for Llama-family decoders: fused projections, weight-major GEMMs.

The engine's forwards through the backbone are small: a decode step feeds one token per
running request, a cached-prefix prefill the few tokens of a question. Their matrix products
have few rows against weights with hundreds of columns and, on a CPU, are bound by reading the
weights, not by FLOPs. Two things make that read cheaper than Hugging Face's forward does:

- **Fused projections.** q/k/v become one ``[Nq + 2 Nkv, d]`` matrix and gate/up one
  ``[2 I, d]``: two GEMMs per layer instead of five, each reading its weights once. The fused
  matrices are built once per model and the model's own ``q_proj``/``k_proj``/... parameters
  become views of them, so no weight is stored twice and the HF forward (``generate``, the
  trainer) reads the same numbers as before.
- **Weight-major products.** Every product is computed as ``(W @ hᵀ)ᵀ`` with ``hᵀ`` a view of
  the contiguous activations ``h`` [rows, d], instead of ``F.linear``'s ``h @ Wᵀ``: on this
  CPU's BLAS the same weights are read 1.2–2.5× faster at 2–32 rows (``python -m bench.step_rows``
  records the step by rows with either forward).
- **rankone's kernels for a few rows.** On a CPU with AVX-512 the products of 1 to 8 rows
  (float32 matrices, bfloat16 copies) run ``one_row``'s kernels (``Products.kernel``): the
  weights read once for all the rows, where the BLAS's GEMMs of 2-8 rows took up to twice as
  long on an Intel Xeon; each row's sums in the same order whatever rows are beside it. An eager
  SmolLM2 step of 4-8 float32 rows 1.5-1.8x faster there, of one bfloat16 row 1.3x
  (``docs/internals.md``).

Everything else is the HF Llama forward (RMSNorm in float32, the model's own rotary-embedding
module, SDPA with the same GQA handling), reading and writing the engine's caches directly:
``step`` writes into the running batch's slot cache, ``prefill`` extends per-layer keys/values
(a cached prompt prefix, or nothing). The numbers equal the HF forward's to float32 rounding
(the products' reduction order differs), not bit for bit: a greedy token can flip only at a
near tie.

It is one implementation of the engine's forward seam (``forward.Forward``).
``FusedLlama.build`` returns ``None`` for what it does not cover (seq2seq, other
architectures, sliding-window attention, tensor-parallel Llama, a non-SiLU MLP); the engine
then runs the HF forward (``forwards.choose_forward``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.engine import one_row
from service.engine.forward import Forward, StepInputs, fastest
from service.engine.kv_cache import SlotKV
from service.engine.kv_layout import KV

log = logging.getLogger("rankone.engine")

_ARCHITECTURES = frozenset({"llama"})
# One decoder per model: building fuses the model's weights, which must happen once.
_BUILT: weakref.WeakKeyDictionary[nn.Module, FusedLlama] = weakref.WeakKeyDictionary()
# each forward's twin with rankone's kernels off (``FusedLlama.without_kernels``)
_WITHOUT_KERNELS: weakref.WeakKeyDictionary[FusedLlama, FusedLlama] = weakref.WeakKeyDictionary()
# attend(layer, keys, values) -> the layer's keys/values to attend over (this call's included)
Attend = Callable[[int, Tensor, Tensor], KV]


def _fuse(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """One matrix for ``linears`` (stacked on the output dim); the modules keep views of it."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    if any(b is not None for b in biases) and not all(b is not None for b in biases):
        raise ValueError("fused projections must all have a bias or none")
    bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None  # type: ignore[union-attr]
    row = 0
    for lin in linears:
        out = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[row : row + out], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row : row + out], requires_grad=False)
        row += out
    return weight, None if bias is None else bias[:, None]


@dataclass(frozen=True)
class Int8Weight:
    """An 8-bit copy of a weight matrix: symmetric per-output-row scales (``w ≈ q · s``).

    Its products read a quarter of float32's bytes, with bfloat16 activations
    (``torch._weight_int8pack_mm``; the same kernel with float32 activations is ~10× slower on
    this CPU). Decode steps only: at 8 rows it runs ~3× faster than the float32 GEMM, at 64 and
    more ~1.2× slower (bench/results/int8_products.md), so prefills keep float32."""

    q: Tensor  # [N, d] int8
    scale: Tensor  # [N] bfloat16

    @classmethod
    def of(cls, w: Tensor) -> Int8Weight:
        scale = (w.abs().amax(dim=1).float() / 127.0).clamp_min(1e-12)
        q = torch.round(w.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scale.to(torch.bfloat16))

    def product(self, x: Tensor, how: Products) -> Tensor:
        """``x @ wᵀ`` from the int8 copy: [n, d] -> [n, N] in ``x``'s dtype. On a CPU the
        int8 kernel; elsewhere (CUDA) the same numbers dequantized into one GEMM, which a
        compiled or graph-captured step fuses."""
        if how.reduce:  # the kernel's numbers (bfloat16 in and out) as one fused reduction
            y = (self.q.float() * x.to(torch.bfloat16).float()).sum(-1) * self.scale.float()
            return y.to(torch.bfloat16)[None].to(x.dtype)
        if x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.q, self.scale)
            return y.to(x.dtype)
        w = self.q.to(torch.bfloat16) * self.scale[:, None]
        return F.linear(x.to(torch.bfloat16), w).to(x.dtype)


@dataclass(frozen=True)
class Int4Weight:
    """A 4-bit copy of a weight matrix in blocks of 32 along its input dim, each block 16
    levels between its least and greatest value (``w ≈ (q - 8) · s + z``: llama.cpp's Q4_1
    form, the block's scale and offset in bfloat16). ``RANKONE_WEIGHTS=int4``.

    A GGUF file in Q4_1 (the demo's SmolLM2) holds its matrices in this form: the float32
    weights rankone loads are their dequantization, and ``of`` recovers every block's levels
    from them exactly, so the copy differs from the file only by its scales' rounding to
    bfloat16 (half-precision in the file); from other weights it is a lossy copy. ``error``
    measures either. Products read an eighth of float32's bytes, with bfloat16 activations and
    float32 accumulation (``torch._weight_int4pack_mm_for_cpu``, whose float32 path is ~25×
    slower; each output row depends on its own input row only). Off a CPU (CUDA): the same
    numbers dequantized into one GEMM. Where rankone's 4-bit kernel runs (``kernels_run`` and
    ``one_row.has_q4``: AVX512-BF16), one-row products run it (``Products.kernel``) from a
    second copy of the levels in its own layout (``one_row.q4_tiles``, ``tiles``: ~70 MB for
    SmolLM2): 36 µs a product where torch's kernel took 45 (``docs/internals.md``)."""

    packed: Tensor  # CPU: torch's int4 packing [N, d / 2] uint8; else the levels [N, d] uint8
    scales_zeros: Tensor  # [d / GROUP, N, 2] bfloat16: (s, z) per block
    shape: tuple[int, int]  # [N, d]
    error: float  # the copy's largest difference from the matrix, relative to its largest |w|
    tiles: tuple[Tensor, Tensor] | None = None  # the 4-bit kernel's layout (``one_row.q4_tiles``)

    GROUP = 32

    @classmethod
    def fits(cls, w: Tensor) -> bool:
        """Whether ``w`` [N, d] has a 4-bit copy: whole blocks along d, N a multiple of 16
        (the CPU kernel's tile)."""
        n, d = w.shape
        return d % cls.GROUP == 0 and n % 16 == 0

    @classmethod
    def of(cls, w: Tensor) -> Int4Weight:
        n, d = w.shape
        blocks = w.detach().float().reshape(n, d // cls.GROUP, cls.GROUP)
        low, high = blocks.amin(-1), blocks.amax(-1)  # [N, blocks]
        scale = (high - low) / 15
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((blocks - low[..., None]) / safe[..., None]).clamp_(0, 15)
        zero = low + 8 * scale  # (q - 8) s + z = q s + low
        scales_zeros = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()
        q = q.reshape(n, d).to(torch.uint8)
        if w.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
        else:
            packed = q
        made = cls(packed, scales_zeros, (n, d), 0.0)
        error = float((made.levels(q) - w).abs().max()) / max(float(w.abs().max()), 1e-30)
        kernel = kernels_run(w.device) and one_row.has_q4() and one_row.fits_q4((n, d))
        tiles = one_row.q4_tiles(q, scales_zeros) if kernel else None
        return dataclasses.replace(made, error=error, tiles=tiles)

    def quanta(self) -> Tensor:
        """The copy's levels q (0 .. 15) as uint8 [N, d]: the CPU packing read back by
        multiplying the identity."""
        n, d = self.shape
        if self.packed.shape == (n, d):
            return self.packed
        unit = torch.ones_like(self.scales_zeros)
        unit[..., 1] = 8.0  # (q - 8) · 1 + 8 = q
        eye = torch.eye(d, dtype=torch.bfloat16, device=self.packed.device)
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.GROUP, unit)
        return q.t().to(torch.uint8)

    def levels(self, q: Tensor | None = None) -> Tensor:
        """The copy's weights as float32 [N, d] (its dequantization; ``q``: its levels [N, d]
        where the caller has them, else read back from the packing)."""
        q = self.quanta() if q is None else q
        sz = self.scales_zeros.float()
        s = sz[..., 0].t().repeat_interleave(self.GROUP, 1)
        z = sz[..., 1].t().repeat_interleave(self.GROUP, 1)
        return (q.float() - 8) * s + z

    def product(self, x: Tensor, how: Products) -> Tensor:
        """``x @ wᵀ`` from the 4-bit copy: [n, d] -> [n, N] in ``x``'s dtype (one row with
        ``how.kernel``: rankone's 4-bit kernel where the copy has its layout). Either rounds
        the row and the output to bfloat16."""
        if how.kernel and self.tiles is not None and x.shape[0] == 1:
            y = one_row.product_q4(x.float(), *self.tiles)  # (x rounded to bfloat16 by it)
            return y.to(torch.bfloat16).to(x.dtype)
        xb = x.to(torch.bfloat16).contiguous()
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                xb, self.packed, self.GROUP, self.scales_zeros
            )
            return y.to(x.dtype)
        return F.linear(xb, self.levels().to(torch.bfloat16)).to(x.dtype)


@dataclass(frozen=True)
class Bf16Weight:
    """A bfloat16 copy of a weight matrix (``RANKONE_WEIGHTS=bfloat16``).

    Its products read half of float32's bytes and run bfloat16 GEMMs (float32 accumulation).
    On a CPU with oneDNN's bfloat16 kernels the copy is oneDNN's prepacked layout of the matrix
    (``torch.ops.mkldnn._linear_pointwise``, what inductor's freezing runs; ``prepacked``), which
    ran a pass over SmolLM2's decoder matrices 1.2-2x faster than the plain bfloat16 GEMM on an
    AMD EPYC without AMX and within 3 % of it on an Intel Xeon with AMX
    (bench/results/decode_kernels.md), with the same numbers as ``torch.mm``, whatever the rows
    beside (checked when made); elsewhere the plain matrix (``w``). Where rankone's kernels run
    (``kernels_run``) the copy keeps the plain matrix beside the prepacked one (about the
    bfloat16 weights again in memory): products of up to ``one_row.MAX_ROWS`` rows read it with
    the kernel (``Products.kernel``), more rows the prepacked GEMM. Activations are rounded to
    bfloat16 for the product only; everything between the products stays float32."""

    w: Tensor | None  # [N, d] bfloat16, where not prepacked or where the kernels read it
    prepacked: Tensor | None = None  # oneDNN's layout of it (an opaque mkldnn tensor)

    @classmethod
    def of(cls, w: Tensor) -> Bf16Weight:
        wb = w.detach().to(torch.bfloat16).contiguous()
        if not _onednn_bf16(wb.device):
            return cls(wb)
        made = cls(None, torch.ops.mkldnn._reorder_linear_weight(wb, 1))
        x = torch.linspace(-1, 1, 3 * wb.shape[1], dtype=torch.bfloat16).reshape(3, -1)
        if not torch.equal(made.product(x, Products()), torch.mm(x, wb.t()).float()):
            return cls(wb)  # not the GEMM's numbers on this machine: the plain matrix
        return dataclasses.replace(made, w=wb) if kernels_run(wb.device) else made

    def plain(self) -> Bf16Weight:
        """This copy as the plain bfloat16 matrix (a compiled step's reductions read it:
        oneDNN's prepacked layout does not compile)."""
        if self.w is not None:
            return self
        assert self.prepacked is not None
        return Bf16Weight(self.prepacked.to_dense().contiguous())

    def product(self, x: Tensor, how: Products) -> Tensor:
        """``x @ wᵀ``: [n, d] -> [n, N] in ``x``'s dtype (rankone's kernel where ``how.kernel``
        and it fits, else the prepacked product, else weight-major: a transposed view;
        ``how.reduce``: a reduction over the plain matrix). Each rounds its output to
        bfloat16, as the GEMM gives it."""
        if self.w is not None and _by_kernel(self.w, how):
            y = one_row.product(x.float(), self.w)  # (x rounded to bfloat16 by the kernel)
            return y.to(torch.bfloat16).to(x.dtype)
        xb = x.to(torch.bfloat16)
        if how.reduce and self.w is not None:  # the GEMM's numbers (bfloat16 out), fused
            return (self.w.float() * xb.float()).sum(-1).to(torch.bfloat16)[None].to(x.dtype)
        if self.prepacked is not None:
            y = torch.ops.mkldnn._linear_pointwise(xb, self.prepacked, None, "none", [], "")
            return y.to(x.dtype)
        assert self.w is not None
        if xb.shape[0] == 1 and how.gemv:
            return torch.mv(self.w, xb[0])[None].to(x.dtype)
        return _pair_mm(self.w, xb).t().to(x.dtype)


@functools.cache
def _onednn_bf16(device: torch.device) -> bool:
    """Whether bfloat16 products on ``device`` can run oneDNN's prepacked kernels (a CPU with
    bfloat16 support in a torch build with oneDNN)."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


@dataclass(frozen=True)
class PackedWeight:
    """A float32 weight matrix with a packed copy of it for small-row GEMMs
    (``RANKONE_WEIGHTS=float32-packed``): oneDNN's (``torch.ops.mkldnn._linear_pointwise``) or
    MKL's (``torch.ops.mkl._mkl_linear``), the two kernels inductor's freezing runs, whichever
    ran a pass over decoder-shaped matrices faster on this CPU (``packing_kind``).

    Measured (2 cores): on an AMD EPYC oneDNN's packed float32 GEMM read SmolLM2's decoder
    matrices 1.3x faster than the best unpacked product at 4 rows, 1.7x at 8, 1.4x at 16 and 32,
    where MKL's was slower than unpacked at every row count (bench/results/decode_kernels.md);
    on an Intel Xeon MKL's made a whole step 1.2x faster at 4 and 8 rows
    (bench/results/peer_llamacpp_intel.md). Products of the row buckets where the packed copy
    measured faster (``Products.packed``) read it, the others the float32 matrix as
    ``FusedLlama`` does. Float32 arithmetic either way (``of`` checks a product against
    ``F.linear``): the numbers equal HF's to float32 rounding, like every product here. One
    copy serves every bucket (the packed format does not depend on the row count it was packed
    for). It costs about the matrix's memory again."""

    w: Tensor  # [N, d] float32, the model's own
    packed: Tensor  # the packed copy (an opaque mkldnn tensor)
    by: str = "mkl"  # whose packed GEMM: "mkl" or "onednn"

    PACKED_FOR = 8  # the row count the copy is packed for: the fastest copy at 4-8 rows here
    KINDS = ("onednn", "mkl")

    @classmethod
    def of(cls, w: Tensor, by: str = "mkl") -> PackedWeight:
        if by == "onednn":
            packed = torch.ops.mkldnn._reorder_linear_weight(w, cls.PACKED_FOR)
        else:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, cls.PACKED_FOR)
        made = cls(w, packed, by)
        x = torch.linspace(-1, 1, 3 * w.shape[1], dtype=w.dtype).reshape(3, -1)
        got, want = made.packed_product(x), F.linear(x, w)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
            raise RuntimeError(f"{by}'s packed product disagrees with F.linear on this machine")
        return made

    def packed_product(self, x: Tensor) -> Tensor:
        """``x @ wᵀ`` [n, N] from the packed copy, any ``n``."""
        if self.by == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return torch.ops.mkl._mkl_linear(x, self.packed, self.w, None, int(x.shape[0]))

    def product(self, x: Tensor, how: Products) -> Tensor:
        """``x @ wᵀ``: [n, N], packed where ``how`` says so (unless rankone's kernel runs the
        float32 matrix: ``how.kernel``), else as a float32 matrix."""
        if how.packed and x.shape[0] > 1 and not _by_kernel(self.w, how):
            return self.packed_product(x)
        return _product_t(self.w, None, x, how).t()


@functools.cache
def packing_kind(device: torch.device) -> str:
    """Whose packed float32 GEMM ``float32-packed`` copies use on ``device``: oneDNN's or
    MKL's, whichever passes over decoder-shaped matrices (SmolLM2's gate/up and down shapes, 2 to
    32 rows) faster, measured once per process (~2 s). A kind whose product is not float32's
    here (an oneDNN set to lower its float32 precision) is not taken."""
    g = torch.Generator().manual_seed(0)
    weights = _decoder_shaped(4, torch.float32, g)
    copies: dict[str, list[PackedWeight]] = {}
    for by in PackedWeight.KINDS:
        try:
            copies[by] = [PackedWeight.of(w, by) for w in weights]
        except RuntimeError as e:
            log.info("float32 packing by %s not taken: %s", by, e)
    if not copies:
        raise RuntimeError("neither oneDNN's nor MKL's packed float32 GEMM is exact here")
    xs = {n: {d: torch.randn(n, d, generator=g) for d in (576, 1536)} for n in LINEAR_BUCKETS}

    def passes(by: str) -> float:
        def one() -> None:
            for x in xs.values():
                for p in copies[by]:
                    p.packed_product(x[p.w.shape[1]])

        return fastest(one, 3)

    times = {by: passes(by) for by in copies}
    chosen = min(times, key=times.__getitem__)
    log.info(
        "float32 packing: %s (%s)",
        chosen,
        ", ".join(f"{by} {t * 1e3:.1f} ms" for by, t in times.items()),
    )
    return chosen


def packing_available(device: torch.device) -> str | None:
    """Why ``float32-packed`` cannot run here, or None: the packed GEMMs are CPU kernels of
    torch builds with MKL and oneDNN."""
    if device.type != "cpu":
        return f"the packed float32 GEMMs run on a CPU, and the backbone is on {device.type}"
    if not (torch._C.has_mkl and torch.backends.mkldnn.is_available()):
        return "this torch build has no MKL or oneDNN"
    return None


class OwnProduct(Protocol):
    """A weight whose products are its own: a copy above, or a compiled step's opaque
    operator over one (``compiled_step.ExternWeight``)."""

    def product(self, x: Tensor, how: Products) -> Tensor: ...


Copy = Int8Weight | Int4Weight | Bf16Weight | PackedWeight  # a copy with its own product
Weight = Tensor | Copy | OwnProduct


def _compute_dtype(weight: Weight) -> torch.dtype:
    """The dtype ``weight``'s products run in (an int8 copy: its own kernel)."""
    if isinstance(weight, Int8Weight):
        return torch.int8
    if isinstance(weight, Int4Weight):
        return torch.quint4x2
    if isinstance(weight, Bf16Weight):
        return torch.bfloat16
    if isinstance(weight, PackedWeight):
        return weight.w.dtype
    if isinstance(weight, Tensor):
        return weight.dtype
    raise TypeError(f"{type(weight).__name__} runs its products itself: no dtype to choose by")


def _gemv_or_gemm(weight: Weight) -> bool:
    """Whether ``weight``'s one-row product is a GEMV or a two-column GEMM as measured
    (``one_row_by_gemv``): a float matrix's, a plain bfloat16 copy's; not a kernel of its own
    (int8, int4, oneDNN's prepacked bfloat16) nor a float32 packed copy (its float32 matrix's,
    measured with the float32 forward)."""
    if isinstance(weight, Bf16Weight):
        return weight.prepacked is None
    return isinstance(weight, Tensor) and weight.is_floating_point()


@dataclass(frozen=True)
class Products:
    """How one forward call's matrix products run: chosen once per call from its row count
    and its weights' dtype (``FusedLlama.products``), from what was measured when the forward
    was built, not per product."""

    gemv: bool = False  # one row: torch.mv (else the two-column GEMM, ``one_row_by_gemv``)
    linear: bool = False  # several rows, float weights: F.linear (else weight-major)
    packed: bool = False  # several rows, a PackedWeight: its packed copy
    reduce: bool = False  # one row as a reduction over the weights (a compiled step's only)
    # 1 to one_row.MAX_ROWS rows where rankone's kernels run (``kernels_run``): a float32
    # matrix's or a bfloat16 copy's plain matrix's products by them (``_by_kernel``), before
    # any of the above
    kernel: bool = False


def _by_kernel(w: Tensor, how: Products) -> bool:
    """Whether the product of the plain matrix ``w`` runs rankone's kernel
    (``one_row.product``): where ``how.kernel`` says so and the kernel takes ``w``."""
    return how.kernel and one_row.fits(w)


@functools.cache
def kernels_run(device: torch.device) -> bool:
    """Whether products of 1 to ``one_row.MAX_ROWS`` rows on ``device`` run rankone's own
    kernels (``one_row``: a CPU with AVX-512, the kernels built and loaded once per process).
    They read the weights once for all the rows, each row's sums in the same order whatever
    rows are beside it (``docs/internals.md``); elsewhere the BLAS's products."""
    if device.type != "cpu":
        return False
    why = one_row.load()
    if why is not None:
        log.info("products of a few rows stay the BLAS's: %s", why)
    return why is None


def _product_t(weight: Weight, bias: Tensor | None, x: Tensor, how: Products) -> Tensor:
    """``(x @ weightᵀ)ᵀ`` (+ bias): [n, d] -> [N, n]. A float32 weight's product is computed
    weight-major (contiguous), or with ``how.linear`` (several rows) as ``F.linear``'s
    ``x @ Wᵀ`` (a transposed view): which one a CPU's BLAS runs faster depends on the CPU and
    the row count (``FusedLlama.linear_rows``). A low-precision copy's is its own (a transposed
    view)."""
    if not isinstance(weight, Tensor):  # a copy with its own product
        y = weight.product(x, how)  # [n, N]
        return (y if bias is None else y + bias.t()).t()
    if weight.dtype == torch.float32 and _by_kernel(weight, how):
        out = one_row.product(x, weight).t()
        return out if bias is None else out + bias
    if how.reduce:
        out = (weight * x).sum(-1)[:, None]
        return out if bias is None else out + bias
    if x.shape[0] == 1 and how.gemv:
        out = torch.mv(weight, x[0])[:, None]
        return out if bias is None else out + bias
    if how.linear and x.shape[0] > 1:
        return F.linear(x, weight, None if bias is None else bias[:, 0]).t()
    return _pair_mm(weight, x, bias)


def _pair_mm(weight: Tensor, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """``weight @ xᵀ`` (+ bias) [N, n] with ``xᵀ`` a view of contiguous rows (unit stride
    along n: the BLAS's fast few-column path); a single row goes in as two (see
    ``one_row_by_gemv``)."""
    one = x.shape[0] == 1
    if one:
        x = x.expand(2, -1)
    xt = x.contiguous().t()
    out = torch.mm(weight, xt) if bias is None else torch.addmm(bias, weight, xt)
    return out[:, :1] if one else out


@functools.cache
def one_row_by_gemv(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a one-row product runs faster as a GEMV (``torch.mv``) than as the two-column
    GEMM it is otherwise given, measured once per process, device and dtype.

    The BLAS decides, and CPUs differ by 3x either way: on an AMD EPYC (OpenBLAS/MKL's AVX2
    paths) float32 GEMV read the weights at half the two-column GEMM's rate; on an Intel
    Sapphire Rapids the two-column float32 GEMM takes 3x the GEMV (bench/results/
    weights_quality.md). The GEMV is chosen where it is at least 10 % faster. The two agree to
    float32 rounding, not bit for bit, like every product here against HF's. Off a CPU: the
    GEMM (a graph-captured step wants one kernel shape)."""
    if device.type != "cpu":
        return False
    # a decode step's kind of matrices (SmolLM2's gate/up and down shapes, ~85 MB in float32:
    # larger than a CPU's last-level cache share): one 6144 x 2048 matrix and no margin chose
    # the GEMV in 1 of 4 processes on an AMD EPYC, where it makes a step 2x slower
    g = torch.Generator().manual_seed(0)
    weights = _decoder_shaped(8, dtype, g)
    xs = {d: torch.randn(1, d, generator=g).to(dtype) for d in (576, 1536)}

    def by_gemv() -> None:
        for w in weights:
            torch.mv(w, xs[w.shape[1]][0])

    def by_pair() -> None:
        for w in weights:
            _pair_mm(w, xs[w.shape[1]])

    gemv, pair = fastest(by_gemv), fastest(by_pair)
    log.info(
        "one-row products (%s): gemv %.2f ms, two-column gemm %.2f ms",
        dtype,
        gemv * 1e3,
        pair * 1e3,
    )
    return gemv < 0.9 * pair


def _decoder_shaped(each: int, dtype: torch.dtype, g: torch.Generator) -> list[Tensor]:
    """Random matrices of a decode step's kind, to time kernels on when a forward is built:
    ``each`` of SmolLM2's gate/up shape [3072, 576] and ``each`` of its down shape [576, 1536]
    (~85 MB in float32 at 8 each: beyond a CPU's last-level cache share, as a step's are)."""
    weights = [torch.randn(3072, 576, generator=g).to(dtype) for _ in range(each)]
    return weights + [torch.randn(576, 1536, generator=g).to(dtype) for _ in range(each)]


LINEAR_BUCKETS = (2, 4, 8, 16, 32)  # row counts (rounded up to a power of two) calibrated
# float32-packed's: LINEAR_BUCKETS and 64, which stands for every count above 32 (prefills)
PACKED_BUCKETS = (*LINEAR_BUCKETS, 64)


def _row_bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


def linear_rows(layers: list[_Layer]) -> frozenset[int]:
    """The row buckets at which ``F.linear`` runs a step's float32 products faster than the
    weight-major product on this CPU: timed once per model over its layers' gate/up and down
    matrices (one pass reads them as a decode step does), ``F.linear`` chosen where it is at
    least 10 % faster.

    Measured: on an AMD EPYC the weight-major product read the weights 1.2-2.5x faster at 2-32
    rows; on an Intel Xeon (Sapphire Rapids) ``F.linear`` makes a whole SmolLM2 step 2.2x faster
    at 2 rows and 1.4x at 4 (the weight-major GEMM there runs at a third of its one-row rate at
    2-16 rows). The two agree to float32 rounding. Off a CPU, or for low-precision copies: none
    (weight-major)."""
    mats = [w for layer in layers for w in (layer.gate_up, layer.down) if isinstance(w, Tensor)]
    if not mats or mats[0].device.type != "cpu" or not mats[0].is_floating_point():
        return frozenset()

    def by_linear(_: int, xs: dict[int, Tensor]) -> None:
        for w in mats:
            F.linear(xs[w.shape[1]], w)

    def by_weight(_: int, xs: dict[int, Tensor]) -> None:
        for w in mats:
            _pair_mm(w, xs[w.shape[1]])

    chosen = faster_buckets({w.shape[1] for w in mats}, mats[0].dtype, by_linear, by_weight)
    log.info(
        "float32 products by F.linear at row buckets %s, weight-major at the rest", sorted(chosen)
    )
    return chosen


# one pass over a set of products: (row bucket, inputs by width) -> None
Pass = Callable[[int, dict[int, Tensor]], None]


def faster_buckets(
    widths: set[int],
    dtype: torch.dtype,
    candidate: Pass,
    current: Pass,
    buckets: tuple[int, ...] = LINEAR_BUCKETS,
) -> frozenset[int]:
    """The row ``buckets`` at which ``candidate``'s pass runs at least 10 % faster than
    ``current``'s, each timed as the fastest of 3 on the same random inputs [n, w] for every
    width: how the forward chooses its products' kinds when it is built."""
    g = torch.Generator().manual_seed(0)
    chosen = set()
    for n in buckets:
        xs = {w: torch.randn(n, w, generator=g).to(dtype) for w in widths}
        fast = fastest(functools.partial(candidate, n, xs), 3)
        if fast < 0.9 * fastest(functools.partial(current, n, xs), 3):
            chosen.add(n)
    return frozenset(chosen)


def _product(weight: Weight, bias: Tensor | None, x: Tensor, how: Products) -> Tensor:
    """``x @ weightᵀ`` (+ bias): [n, d] -> [n, N] (a low-precision copy's own product, else a
    transposed view of ``_product_t``)."""
    if not isinstance(weight, Tensor):  # a copy with its own product
        y = weight.product(x, how)
        return y if bias is None else y + bias.t()
    return _product_t(weight, bias, x, how).t()


def _rms_norm(h: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF's Llama RMSNorm over the last dim of float32 ``h``: ``torch.rms_norm``, whose CPU
    kernel is HF's formula (``h · rsqrt(mean(h²) + eps) · weight``, the same numbers) in one
    operator call instead of seven (at one row a decode step's norms are their calls' cost)."""
    return torch.rms_norm(h, (int(h.shape[-1]),), weight, eps)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True = attend) as an additive bias: 0 where True, -inf where False."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def _decode_attention(
    q: Tensor, keys: Tensor, values: Tensor, bias: Tensor | None, reduce: bool = False
) -> Tensor:
    """Softmax attention of ``q`` [B, H_kv, g, Dh] (pre-scaled) over ``keys``/``values``
    [B, H_kv, W, Dh] with an additive ``bias`` [B, 1, 1, W]: [B, H_kv, g, Dh].

    Two batched products and a softmax: at one query per row this runs in about two thirds of
    the time of CPU SDPA over the same views (its math path, taken here, also rescales the keys).
    Every row attends to its own new column, so no row is fully masked.

    ``reduce`` (a compiled one-row step's, ``Products.reduce``): the same sums written as
    reductions over the window, which inductor fuses into the loops around them, where the two
    products are two BLAS calls a layer (~20-30 µs each at one row; fused, a one-row ``int8``
    step went 9.3 → 8.7 ms at ~100 columns). The weights are normalised after the product with
    the values (one division of [B, H_kv, g, Dh], not of every term): so each product's terms
    are a product of two loads, which the graph's options keep inside the reduction's loop
    (their terms, [B, H_kv, g, W, Dh], stored before summing slowed steps with the window: 2×
    the eager step at 8 rows and ~800 columns, ``docs/internals.md``).
    """
    if reduce:
        scores = (q[:, :, :, None] * keys[:, :, None]).sum(-1)  # [B, H_kv, g, W]
        if bias is not None:
            scores = scores + bias
        e = (scores - scores.amax(-1, keepdim=True)).exp()
        return (e[..., None] * values[:, :, None]).sum(-2) / e.sum(-1, keepdim=True)
    b, kv_heads, g, dh = (int(s) for s in q.shape)
    w = int(keys.shape[2])
    # [B · H_kv, ...] batches: the cache's windows flatten to views (rows and heads are its
    # outer dims), so each product is one bmm call, as matmul would run it
    scores = torch.bmm(q.reshape(b * kv_heads, g, dh), keys.flatten(0, 1).transpose(1, 2))
    scores = scores.view(b, kv_heads, g, w)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(-1).view(b * kv_heads, g, w)
    return torch.bmm(probs, values.flatten(0, 1)).view(b, kv_heads, g, dh)


def _repeat_kv(x: Tensor, group: int) -> Tensor:
    """[B, H_kv, W, Dh] -> [B, H_kv * group, W, Dh], each KV head repeated for its group."""
    if group == 1:
        return x
    b, h, w, dh = x.shape
    return x[:, :, None].expand(b, h, group, w, dh).reshape(b, h * group, w, dh)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's rotary embedding ``x · cos + rotate_half(x) · sin`` with ``sin``'s first half
    negated beforehand (``_step_rotation``): the halves swapped by one ``roll``, the same
    numbers in three calls instead of seven."""
    return x * cos + torch.roll(x, int(x.shape[-1]) // 2, -1) * sin


@dataclass
class _Layer:
    norm1: Tensor  # [d]
    eps1: float
    qkv: Weight  # [Nq + 2 Nkv, d]
    qkv_bias: Tensor | None
    o: Weight  # [d, Nq]
    o_bias: Tensor | None
    norm2: Tensor
    eps2: float
    gate_up: Weight  # [2 I, d]
    gate_up_bias: Tensor | None
    down: Weight  # [d, I]
    down_bias: Tensor | None

    def converted(self, copy: Callable[[Tensor], Weight]) -> _Layer:
        """This layer with ``copy`` of its four weight matrices (norms, biases as they are)."""

        def q(w: Weight) -> Weight:
            assert isinstance(w, Tensor), "already converted"
            return copy(w)

        return dataclasses.replace(
            self, qkv=q(self.qkv), o=q(self.o), gate_up=q(self.gate_up), down=q(self.down)
        )


def _unsupported(model: Any) -> str | None:
    """Why ``model`` is not covered, or None."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if getattr(config, "model_type", "") not in _ARCHITECTURES:
        return f"architecture {getattr(config, 'model_type', '?')!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "no model.layers / lm_head"
    if getattr(model.lm_head, "bias", None) is not None:
        return "an lm_head bias"
    return None


class FusedLlama(Forward):
    """Decode steps and prefills of a Llama-family model (see module doc)."""

    kind = "fused"

    def __init__(self, model: Any) -> None:
        config = model.config
        inner = model.model
        self.embed_tokens: nn.Embedding = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm.weight.detach()
        self.norm_eps = float(inner.norm.variance_epsilon)
        self.head = model.lm_head.weight.detach()  # [V, d] (tied or not)
        # per products' dtype: one row as a GEMV? (measured now, not in a request)
        self.one_row_gemv = {self.head.dtype: one_row_by_gemv(self.head.device, self.head.dtype)}
        self.kernels = kernels_run(self.head.device)  # products of a few rows by rankone's
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.scaling = float(inner.layers[0].self_attn.scaling)
        self.layers: list[_Layer] = []
        for layer in inner.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, qkv_bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up, gate_up_bias = _fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append(
                _Layer(
                    norm1=layer.input_layernorm.weight.detach(),
                    eps1=float(layer.input_layernorm.variance_epsilon),
                    qkv=qkv,
                    qkv_bias=qkv_bias,
                    o=attn.o_proj.weight.detach(),
                    o_bias=None if attn.o_proj.bias is None else attn.o_proj.bias.detach()[:, None],
                    norm2=layer.post_attention_layernorm.weight.detach(),
                    eps2=float(layer.post_attention_layernorm.variance_epsilon),
                    gate_up=gate_up,
                    gate_up_bias=gate_up_bias,
                    down=mlp.down_proj.weight.detach(),
                    down_bias=(
                        None if mlp.down_proj.bias is None else mlp.down_proj.bias.detach()[:, None]
                    ),
                )
            )
        self.linear_rows = linear_rows(self.layers)  # measured now, not in a request
        self.packed_rows: frozenset[int] = frozenset()  # FusedLlamaPacked's

    @classmethod
    def build(cls, model: Any) -> FusedLlama | None:
        """The fused forward of ``model`` (built once), or None where it is not covered."""
        reason = _unsupported(model)
        if reason is not None:
            log.info("fused Llama forward off: %s; the engine runs the HF forward", reason)
            return None
        if model not in _BUILT:
            _BUILT[model] = cls(model)
        return _BUILT[model]

    def decode_copies(self, weights: str) -> FusedLlama:
        """This forward whose decode steps read ``weights`` copies of the weights: ``int8``
        (``FusedLlamaInt8``), ``int4`` (``FusedLlamaInt4``), ``bfloat16`` (``FusedLlamaBf16``)
        or ``float32-packed`` (``FusedLlamaPacked``); ``float32``: itself. Built once per model
        and kind."""
        if weights == "float32":
            return self
        kinds: dict[str, type[FusedLlamaCopies]] = {
            "int8": FusedLlamaInt8,
            "int4": FusedLlamaInt4,
            "bfloat16": FusedLlamaBf16,
            "float32-packed": FusedLlamaPacked,
        }
        return kinds[weights].of(self)

    def without_kernels(self) -> FusedLlama:
        """This forward with rankone's kernels off (``RANKONE_CPU_KERNELS=false``): its
        products of a few rows the BLAS's; the same weights and measured choices, built once."""
        if not self.kernels:
            return self
        if self not in _WITHOUT_KERNELS:
            made = copy.copy(self)
            made.kernels = False
            _WITHOUT_KERNELS[self] = made
        return _WITHOUT_KERNELS[self]

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids)

    def products_by(self) -> str:
        return "rankone" if self.kernels else "torch"

    def step(self, inputs: StepInputs) -> Tensor:
        """A decode step: next-token logits [n, V] for ``inputs.tokens`` [n] at their
        positions [n]; each layer's new keys/values go to the slot cache's open column."""
        x = self.embed_tokens(inputs.tokens)
        h = self._step_layers(x, inputs.positions, inputs.mask, inputs.kv.write, self.step_layers)
        return self._logits(h, self.step_head)

    def step_full(
        self, tokens: Tensor, positions: Tensor, kv: SlotKV, n: int, column: Tensor
    ) -> Tensor:
        """A decode step with fixed shapes and addresses (what a CUDA graph captures,
        ``graphed.GraphedStep``): ``n`` rows attend over the slot cache's whole capacity, its
        mask hiding every column that is not a row's own (``SlotKV``'s invariant), and write
        their keys/values at ``column`` [1] (a device tensor). The same numbers as ``step`` to
        float32 rounding (masked columns add exact zeros)."""
        x = self.embed_tokens(tokens)
        mask = kv.mask[:n][:, None, None, :]  # [n, 1, 1, C]

        def attend(i: int, k: Tensor, v: Tensor) -> KV:
            keys, values = kv.keys[i][:n], kv.values[i][:n]
            keys.index_copy_(2, column, k)
            values.index_copy_(2, column, v)
            return keys, values

        h = self._step_layers(x, positions, mask, attend, self.step_layers)
        return self._logits(h, self.step_head)

    def prefill(
        self, embeds: Tensor, positions: Tensor, mask: Tensor, past: Sequence[KV] | None = None
    ) -> tuple[Tensor, list[KV]]:
        """See ``Forward.prefill``: ``embeds`` [B, T, d] after ``past`` (P columns, or none).

        Each query attends causally to the real columns up to its own, and always to itself
        (a padding query then stays finite; nothing reads it).
        """
        t, width = int(embeds.shape[1]), int(mask.shape[1])
        keys_ok = mask.bool()[:, None, None, :]  # [B, 1, 1, P + T]
        col = torch.arange(width, device=embeds.device)
        row = torch.arange(width - t, width, device=embeds.device)[:, None]  # query t's own column
        allowed = (keys_ok & (col <= row)) | (col == row)  # [B, 1, T, P + T]
        layers: list[KV] = []

        def attend(i: int, k: Tensor, v: Tensor) -> KV:
            if past is not None:
                k = torch.cat([past[i][0], k], dim=2)
                v = torch.cat([past[i][1], v], dim=2)
            layers.append((k, v))
            return k, v

        h = self._layers(embeds, positions, allowed, attend, self.prefill_layers)
        return self._logits(h[:, -1], self.prefill_head), layers

    def _logits(self, h: Tensor, head: Weight | None = None, how: Products | None = None) -> Tensor:
        """[n, d] last hidden states -> [n, V] logits (final norm, lm_head)."""
        norm = _rms_norm(h, self.norm, self.norm_eps)
        head = self.head if head is None else head
        how = self.products(int(norm.shape[0]), head) if how is None else how
        return _product(head, None, norm, how).contiguous()

    def products(self, rows: int, weight: Weight) -> Products:
        """How a call's products over ``rows`` rows of weights like ``weight`` run: up to
        ``one_row.MAX_ROWS`` rows by rankone's kernels where they run (``kernels_run``) and
        take the weight; else one row as a GEMV or not (``one_row_by_gemv``), several as
        ``F.linear`` or weight-major (``linear_rows``), as measured when this forward was
        built."""
        kernel = self.kernels and rows <= one_row.MAX_ROWS
        if rows == 1:
            gemv = self.one_row_gemv.get(_compute_dtype(weight), False)
            return Products(gemv=gemv, kernel=kernel)
        packed = min(_row_bucket(rows), PACKED_BUCKETS[-1]) in self.packed_rows
        return Products(linear=self.by_linear(rows), packed=packed, kernel=kernel)

    def by_linear(self, rows: int) -> bool:
        """Whether a product over ``rows`` rows runs as ``F.linear`` (see ``linear_rows``)."""
        return 1 < rows <= LINEAR_BUCKETS[-1] and _row_bucket(rows) in self.linear_rows

    @property
    def step_layers(self) -> list[_Layer]:
        """The layers a decode step runs (prefills run ``layers``)."""
        return self.layers

    @property
    def step_head(self) -> Weight:
        """The lm_head a decode step reads."""
        return self.head

    @property
    def prefill_layers(self) -> list[_Layer]:
        """The layers a prefill runs."""
        return self.layers

    @property
    def prefill_head(self) -> Weight:
        """The lm_head a prefill reads."""
        return self.head

    def _layers(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor,
        attend: Attend,
        layers: list[_Layer] | None = None,
    ) -> Tensor:
        """The decoder layers over ``x`` [B, T, d] at ``positions`` [B, T]: [B, T, d]."""
        layers = self.layers if layers is None else layers
        b, t, d = (int(s) for s in x.shape)
        if t == 1:
            return self._step_layers(x[:, 0], positions[:, 0], mask, attend, layers)[:, None]
        cos, sin = self.rotary(x, positions)  # [B, T, Dh]
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh]: broadcast over heads
        dh, heads, kv_heads = self.head_dim, self.heads, self.kv_heads
        nq, nkv = heads * dh, kv_heads * dh
        group = heads // kv_heads
        h = x.reshape(b * t, d)  # the products' rows: every (row, position)
        how = self.products(b * t, layers[0].qkv)
        for i, layer in enumerate(layers):
            qkv = _product(layer.qkv, layer.qkv_bias, _rms_norm(h, layer.norm1, layer.eps1), how)
            qkv = qkv.reshape(b, t, -1)
            q = qkv[..., :nq].reshape(b, t, heads, dh).transpose(1, 2)  # [B, H, T, Dh]
            k = qkv[..., nq : nq + nkv].reshape(b, t, kv_heads, dh).transpose(1, 2)
            v = qkv[..., nq + nkv :].reshape(b, t, kv_heads, dh).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = attend(i, k, v)  # [B, H_kv, W, Dh], this call's columns included
            out = F.scaled_dot_product_attention(  # each query head over its KV head's keys
                q,
                _repeat_kv(keys, group),
                _repeat_kv(values, group),
                attn_mask=mask,
                scale=self.scaling,
            ).transpose(1, 2)  # [B, T, H, Dh]
            h = h + _product(layer.o, layer.o_bias, out.reshape(b * t, nq), how)
            h = self._mlp(layer, h, how)
        return h.reshape(b, t, d)

    def _step_layers(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor,
        attend: Attend,
        layers: list[_Layer],
        how: Products | None = None,
    ) -> Tensor:
        """The decoder layers over one token per row, ``x`` [n, d] at ``positions`` [n]:
        [n, d]. ``_layers``' numbers at one position, bit for bit, in fewer operator calls: at
        one row a step's time beyond its products is the calls' own cost (~4.3 ms of an 11 ms
        int4 step on an AMD EPYC, ~140 µs a layer). Per step, not per layer: the mask as one
        additive bias, the rotation's tables for queries and keys together, the attention's
        scale folded into the queries' (``_step_rotation``)."""
        n = int(x.shape[0])
        dh, heads, kv_heads = self.head_dim, self.heads, self.kv_heads
        nqk = (heads + kv_heads) * dh
        cos, sin = self._step_rotation(x, positions)  # [n, H + H_kv, Dh]
        bias = mask if mask.is_floating_point() else _additive(mask, x.dtype)
        how = self.products(n, layers[0].qkv) if how is None else how
        h = x
        for i, layer in enumerate(layers):
            qkv = _product(layer.qkv, layer.qkv_bias, _rms_norm(h, layer.norm1, layer.eps1), how)
            qk = _rotate(qkv[:, :nqk].reshape(n, heads + kv_heads, dh), cos, sin)
            v = qkv[:, nqk:].reshape(n, kv_heads, 1, dh)
            keys, values = attend(i, qk[:, heads:, None], v)  # [n, H_kv, W, Dh]
            # one query per row: a group's heads attend as queries of one KV head
            q = qk[:, :heads].view(n, kv_heads, heads // kv_heads, dh)
            out = _decode_attention(q, keys, values, bias, how.reduce)  # [n, H_kv, g, Dh]
            h = h + _product(layer.o, layer.o_bias, out.reshape(n, heads * dh), how)
            h = self._mlp(layer, h, how)
        return h

    def _step_rotation(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """A decode step's rotary tables for its queries and keys at once, (cos, sin)
        [n, H + H_kv, Dh]: the sines' first half negated (``_rotate``), the queries' heads
        scaled by the attention's scale."""
        n = int(x.shape[0])
        cos, sin = self.rotary(x[:, None], positions[:, None])  # [n, 1, Dh]
        half = self.head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)
        tables = [
            torch.cat(
                [(t * self.scaling).expand(n, self.heads, -1), t.expand(n, self.kv_heads, -1)], 1
            )
            for t in (cos, sin)
        ]
        return tables[0], tables[1]

    @staticmethod
    def _mlp(layer: _Layer, h: Tensor, how: Products) -> Tensor:
        """``h`` [rows, d] after the layer's MLP block (norm, gate/up, SiLU, down, residual)."""
        # gate/up as [2 I, rows]: weight-major, the activation runs over contiguous halves
        a = _product_t(
            layer.gate_up, layer.gate_up_bias, _rms_norm(h, layer.norm2, layer.eps2), how
        )
        inter = a.shape[0] // 2
        act = F.silu(a[:inter]).mul_(a[inter:])  # [I, rows]
        return h + _product(layer.down, layer.down_bias, act.t(), how)


# The low-precision forwards of a model, by kind, built from its float32 one (whose fused
# weights they share).
_BUILT_COPIES: weakref.WeakKeyDictionary[FusedLlama, dict[str, FusedLlamaCopies]] = (
    weakref.WeakKeyDictionary()
)


class FusedLlamaCopies(FusedLlama):
    """The fused forward whose decode steps (and prefills, where ``copy_prefill``) read
    low-precision copies of the weights (``RANKONE_WEIGHTS``); the embeddings stay float32. A
    row's numbers never depend on the other rows (a step's products are per row, and which
    weights a call reads depends on the call's kind only), so a mixed batch still decodes what
    each request decodes alone; against float32 it is not exact: greedy agreement and task
    accuracy are measured (``python -m bench.weights_quality``)."""

    kind = "fused-copies"
    copy_head = False  # the lm_head too (else float32)
    copy_prefill = False  # prefills read the copies too (else float32)
    copy_layers: list[_Layer]
    copied_head: Weight

    @staticmethod
    def copy(w: Tensor) -> Weight:
        raise NotImplementedError

    @classmethod
    def head_copy(cls, w: Tensor) -> Weight:
        """The lm_head's copy (where ``copy_head``): the layers' kind, unless a forward says."""
        return cls.copy(w)

    @classmethod
    def of(cls, base: FusedLlama) -> FusedLlamaCopies:
        built = _BUILT_COPIES.setdefault(base, {})
        if cls.kind not in built:
            made = cls.__new__(cls)
            # the same layers, embeddings, rotary, head, measured choices: base's own state,
            # not an instance attribute shadowing the class's behaviour (a patched method
            # would run base's weights)
            made.__dict__.update(
                {k: v for k, v in base.__dict__.items() if not hasattr(FusedLlama, k)}
            )
            made.copy_layers = [layer.converted(cls.copy) for layer in base.layers]
            made.copied_head = cls.head_copy(base.head) if cls.copy_head else base.head
            made.one_row_gemv = dict(base.one_row_gemv)
            for w in (made.copy_layers[0].qkv, made.copied_head):  # the copies' own dtypes
                dtype = _compute_dtype(w)
                if _gemv_or_gemm(w) and dtype not in made.one_row_gemv:
                    made.one_row_gemv[dtype] = one_row_by_gemv(base.head.device, dtype)
            made.calibrate()
            built[cls.kind] = made
        return built[cls.kind]

    def calibrate(self) -> None:
        """Measure, once when built, what the copies' products choose by (none here)."""

    @property
    def step_layers(self) -> list[_Layer]:
        return self.copy_layers

    @property
    def step_head(self) -> Weight:
        return self.copied_head

    @property
    def prefill_layers(self) -> list[_Layer]:
        return self.copy_layers if self.copy_prefill else self.layers

    @property
    def prefill_head(self) -> Weight:
        return self.copied_head if self.copy_prefill else self.head


class FusedLlamaInt8(FusedLlamaCopies):
    """``RANKONE_WEIGHTS=int8``: decode steps read 8-bit copies of the decoder layers' weights
    and of the lm_head (``Int8Weight``; the lm_head's one-row GEMV is 3.8x faster from 8 bits on
    an AMX CPU); prefills stay float32 (the int8 kernel is slower than the float32 GEMM from ~64
    rows)."""

    kind = "fused-int8"
    copy_head = True

    @staticmethod
    def copy(w: Tensor) -> Weight:
        return Int8Weight.of(w)


class FusedLlamaInt4(FusedLlamaCopies):
    """``RANKONE_WEIGHTS=int4``: decode steps read 4-bit copies of the decoder layers' weights
    (``Int4Weight``: blocks of 32, llama.cpp's Q4_1 form; a matrix whose shape has no such copy
    stays float32) and an 8-bit copy of the lm_head (``Int8Weight``: the demo file holds it in
    Q8_0), with bfloat16 activations; prefills read float32. On a Q4_1 GGUF file (the demo's
    SmolLM2) the 4-bit copies hold the file's own levels, their block scales rounded to
    bfloat16; on other weights they are lossier (the log says by how much: ``copy_error``).
    Greedy agreement with float32 is measured (``python -m bench.weights_quality``)."""

    kind = "fused-int4"
    copy_head = True
    copy_error = 0.0  # the copies' largest relative difference from the float32 weights

    @staticmethod
    def copy(w: Tensor) -> Weight:
        return Int4Weight.of(w) if Int4Weight.fits(w) else w

    @classmethod
    def head_copy(cls, w: Tensor) -> Weight:
        return Int8Weight.of(w)

    def calibrate(self) -> None:
        copies = [
            w
            for layer in self.copy_layers
            for w in (layer.qkv, layer.o, layer.gate_up, layer.down)
            if isinstance(w, Int4Weight)
        ]
        self.copy_error = max((w.error for w in copies), default=0.0)
        log.info(
            "int4 copies of %d of %d decoder matrices; largest difference from the float32 "
            "weights: %.3g of a matrix's largest weight%s",
            len(copies),
            4 * len(self.copy_layers),
            self.copy_error,
            " (the weights are 4-bit blocks already: exact)" if self.copy_error == 0 else "",
        )


class FusedLlamaBf16(FusedLlamaCopies):
    """``RANKONE_WEIGHTS=bfloat16``: decode steps and prefills read bfloat16 copies of the
    decoder layers' weights and of the lm_head (``Bf16Weight``: faster than float32 at every
    row count where the CPU has bfloat16 kernels; at 8 rows the float32 lm_head alone is a
    quarter of a step on an AMX CPU)."""

    kind = "fused-bf16"
    copy_head = True
    copy_prefill = True

    @staticmethod
    def copy(w: Tensor) -> Weight:
        return Bf16Weight.of(w)


class FusedLlamaPacked(FusedLlamaCopies):
    """``RANKONE_WEIGHTS=float32-packed``: decode steps' products over the row buckets where
    the packed GEMM (oneDNN's or MKL's, ``packing_kind``) measured faster on this CPU
    (``packed_rows``) read packed copies of the decoder layers' float32 weights
    (``PackedWeight``) and of the lm_head (at 16 and 32 rows oneDNN's packed lm_head took
    under half the unpacked one's time on an AMD EPYC), in decode steps and in prefills (a
    prefill of more than 32 rows where the 64-row bucket measured faster: oneDNN's packed GEMM
    ran 64-256 rows 1.3x faster than the unpacked one on that CPU); other row counts read the
    float32 matrices. Float32 arithmetic throughout: exact against HF to float32 rounding, as
    the float32 forward is. Costs about the decoder layers' and the lm_head's weights again in
    memory (SmolLM2-135M: ~540 MB)."""

    kind = "fused-f32-packed"
    copy_head = True
    copy_prefill = True

    @staticmethod
    def copy(w: Tensor) -> Weight:
        return PackedWeight.of(w, packing_kind(w.device))

    def calibrate(self) -> None:
        self.packed_rows = packed_rows(self.copy_layers, self.linear_rows)


def packed_rows(layers: list[_Layer], linear: frozenset[int]) -> frozenset[int]:
    """The row buckets (``PACKED_BUCKETS``; 64: every count above 32) at which the packed
    copies run a call's products at least 10 % faster than the float32 matrices as
    ``FusedLlama`` runs them (``linear_rows``' choice per bucket), timed once over the layers'
    gate/up and down matrices (~2 s for SmolLM2)."""
    mats = [
        w for layer in layers for w in (layer.gate_up, layer.down) if isinstance(w, PackedWeight)
    ]
    if not mats:
        return frozenset()

    def plain(n: int, xs: dict[int, Tensor]) -> None:
        how = Products(linear=n in linear)
        for w in mats:
            _product_t(w.w, None, xs[w.w.shape[1]], how)

    def packed(_: int, xs: dict[int, Tensor]) -> None:
        for w in mats:
            w.packed_product(xs[w.w.shape[1]])

    chosen = faster_buckets(
        {w.w.shape[1] for w in mats}, mats[0].w.dtype, packed, plain, PACKED_BUCKETS
    )
    log.info("float32 products from packed copies at row buckets %s", sorted(chosen))
    return chosen
