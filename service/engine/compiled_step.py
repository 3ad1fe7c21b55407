"""Decode steps compiled by inductor: the fused forward's step without its operator calls.

A decode step with one running request reads every weight once for one row of activations. On a
CPU the eager fused step spends half of it outside its products: ~600 operator calls at ~7 µs
each (norms, rotations, attention, residuals) and products whose one-row kernels run at half the
memory's rate (``torch._weight_int8pack_mm`` reads 8-bit weights at ~14 GB/s on an AMD EPYC, a
fused reduction at ~27 GB/s). ``torch.compile`` (inductor's C++ backend) turns the whole
one-row step into a few C++ loops: the 8- and 4-bit copies' products reductions over the
weights fused with their dequantization, the norms and the elementwise work around them, the
attention over the window as reductions too (``_decode_attention(reduce=True)``, written so
that inductor keeps each product's terms inside its loop: stored, they slowed steps with the
window). On SmolLM2-135M in ``int8`` (AMD EPYC, 2 threads) a one-row forward takes ~6 ms
against ~14 ms eager (``bench/results/peer_llamacpp.md``). Float32 matrices and bfloat16
copies are read by rankone's own kernels where the CPU has AVX-512 (``one_row``, one operator
per product: ``Products.kernel``, as the eager forward runs them): inductor's reduction keeps
one accumulator per output row and runs at the adder's latency (~26 GB/s of bfloat16 weights
on an Intel Xeon that reads ~50), the kernels four rows per pass (bfloat16 by ``vdpbf16ps``):
the one-row ``bfloat16`` step ~1.3-1.5x faster there, ``float32`` ~1.2x; elsewhere the
reductions. 4-bit copies, whose
one-row products were torch's int4 kernel, run rankone's 4-bit kernel where the CPU has
AVX512-BF16 (``Int4Weight.tiles``: ~20 % less time in the step's products).

Steps of several rows have a second graph: a reduction reads the weights once per row, where a
GEMM reads them once, so there every product stays the eager forward's own kernel, called from
the graph as one opaque operator (``ExternWeight``, ``rankone::product``: oneDNN's prepacked
bfloat16 or float32 copies, the int8 and int4 kernels, the float32 GEMM measured fastest at
that row count), and the graph fuses what lies between them (norms, rotations, the attention,
residuals, the copies' bfloat16 roundings). The rows' count is a symbol: one graph for 2 rows
and for 32. Its attention stays the eager step's two batched products (the BLAS's). Up to
``one_row.MAX_ROWS`` (8) rows, the float32 matrices' and bfloat16 copies' eager products are
rankone's kernels where they build (``one_row``: the weights read once for all the rows, each
row's numbers its one-row product's): SmolLM2's several-row steps on an Intel Xeon 1.05-1.7x
faster (``bfloat16``) and 1.2-1.6x (float32) at 2-8 rows than with the eager GEMMs.

What is compiled is ``FusedLlama._step_layers`` itself: the same code, so the same numbers up
to the order of each sum (each low-precision product rounds as its eager kernel does: bfloat16
activations, an int8 product's output in bfloat16; extern products are the eager ones).

One graph serves every step of its kind: the window's bounds, the slot cache's size and the
rows' capacity are symbols (``dynamic=True``; the model's weights and head sizes are static).
Both are compiled before serving (``prepare``, on scratch caches whose sizes are not 0, 1 nor
each other, so that no size is specialised) and precompiled (``aot_compile``): a step calls the
graph as a plain function, without Dynamo's frame hook and cache lookup, after checking Dynamo's
guards over its arguments only (``_input_guards``: not over the weights, which nothing changes;
~0.05 ms where all guards took 0.2). 2.5-3.5 minutes for SmolLM2 on 2 cores the first time on
a machine, ~40 s after (AOTAutograd's and inductor's on-disk caches, ``TORCHINDUCTOR_CACHE_DIR``,
found by name: ``_stable_graph_names``).
``bfloat16``'s copies are oneDNN's prepacked layout, which inductor cannot lower: its one-row
step reads plain bfloat16 copies of them (``_plain``: the bfloat16 weights again in memory). A
step that would need another graph (or a compile that fails: no C++ compiler) runs eagerly
instead, counted in ``misses`` and logged, never compiled while serving.
CPU only: on a GPU the decode step replays CUDA graphs (``graphed.GraphedStep``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import re
import time
import unittest.mock
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
import torch._dynamo.output_graph as dynamo_output
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch import Tensor

from service.engine import one_row
from service.engine.forward import StepInputs, StepOf
from service.engine.fused_llama import (
    Bf16Weight,
    FusedLlama,
    Int4Weight,
    Int8Weight,
    Products,
    Weight,
    _Layer,
    _product,
    _product_t,
)
from service.engine.kv_cache import SlotKV
from service.engine.kv_layout import KV

log = logging.getLogger("rankone.engine")
# inductor's options for these graphs: every elementwise result is its own buffer (without it
# a product's loop recomputes its input's norm for every weight row: half the speed; the
# several-row graph measured slower without it too, 2026-12-05), and casts to bfloat16 round as
# they do eagerly (the eager kernels' numbers)
_OPTIONS: dict[str, Any] = {"realize_opcount_threshold": 0, "emulate_precision_casts": True}
# ... except that the one-row graph keeps a product of two loads inside the reduction that
# reads it (the attention's, ``_decode_attention(reduce=True)``; at 0 inductor stores every
# term of them); norms and roundings, more than three operations, are still stored
_ONE_ROW_REALIZE = 3
# prepare's scratch caches: 9 row slots, rows of 65 columns (their window then starts at column
# 64, ends at 129, in 256 columns); one row, or _SCRATCH_SEVERAL rows: no size 0, 1 or
# another's (see module doc)
_SCRATCH_SLOTS, _SCRATCH_COLUMNS, _SCRATCH_SEVERAL = 9, 65, 5


class ExternWeight:
    """A weight whose product runs inside a compiled step as one opaque operator
    (``rankone::product``) that calls the eager forward's own product for the call's row count
    (``products``): the same kernel and numbers as an eager step (oneDNN's prepacked bfloat16
    or float32 copies, the int8 and int4 kernels, the float32 GEMM measured fastest at that
    many rows; rankone's kernels for up to ``one_row.MAX_ROWS`` rows where they run), the graph
    fusing everything between the products. The operator finds the
    weight by ``key`` (a string in the graph: a constant, where an int would become a symbol;
    not a tensor: no guards over the weights)."""

    _keys: ClassVar[Iterator[int]] = itertools.count()
    by_key: ClassVar[weakref.WeakValueDictionary[str, ExternWeight]] = weakref.WeakValueDictionary()

    def __init__(
        self,
        weight: Weight,
        out: int,
        products: Callable[[int, Weight], Products],
        dtype: torch.dtype | None = None,
    ):
        self.weight, self.out, self.products = weight, out, products
        self.dtype = dtype  # what the product's kernel takes and gives (None: the rows')
        # a float matrix's product comes weight-major ([N, n], ``_product_t``: the MLP's
        # activation then runs over contiguous halves, as eagerly), a copy's as [n, N]
        self.weight_major = isinstance(weight, Tensor)
        self._how: dict[int, Products] = {}  # by row count: ``products``' answer, asked once
        self.key = f"w{next(ExternWeight._keys)}"
        ExternWeight.by_key[self.key] = self

    @classmethod
    def of(
        cls,
        weight: Weight,
        width: int,
        products: Callable[[int, Weight], Products],
        like: Tensor,
    ) -> ExternWeight:
        """``weight`` (taking rows of ``width``) as an extern product; its output width found
        by one product of zeros of ``like``'s dtype."""
        x = torch.zeros(2, width, dtype=like.dtype, device=like.device)
        out = int(_product(weight, None, x, products(2, weight)).shape[1])
        # copies whose kernels take bfloat16 rows: the graph rounds the rows (and widens the
        # product) in its own loops, as the copy's product does eagerly
        low = isinstance(weight, Int8Weight | Int4Weight | Bf16Weight) and like.is_floating_point()
        return cls(weight, out, products, torch.bfloat16 if low else None)

    def how(self, rows: int) -> Products:
        """How the eager forward runs this weight's product over ``rows`` rows (fixed when it
        was built: asked once per row count, not in every step's every product)."""
        if rows not in self._how:
            self._how[rows] = self.products(rows, self.weight)
        return self._how[rows]

    def product(self, x: Tensor, how: Products) -> Tensor:
        """``x @ wᵀ`` [n, N] (a transposed view where the operator gives it weight-major)."""
        y = torch.ops.rankone.product(x if self.dtype is None else x.to(self.dtype), self.key)
        y = y.t() if self.weight_major else y
        return y if self.dtype is None else y.to(x.dtype)


@torch.library.custom_op("rankone::product", mutates_args=(), device_types="cpu")
def _extern_product(x: Tensor, key: str) -> Tensor:
    """``x @ wᵀ`` for ExternWeight ``key``, its eager product at ``n`` rows: [n, N], or
    [N, n] where the weight is a float matrix (``weight_major``)."""
    w = ExternWeight.by_key[key]
    how = w.how(int(x.shape[0]))
    if w.weight_major:
        return _product_t(w.weight, None, x, how).contiguous()
    return _product(w.weight, None, x, how).contiguous()


@_extern_product.register_fake
def _(x: Tensor, key: str) -> Tensor:
    w = ExternWeight.by_key[key]
    return x.new_empty((w.out, x.shape[0]) if w.weight_major else (x.shape[0], w.out))


class CompiledStep(StepOf):
    """A fused forward whose decode steps run compiled (see module doc): one graph for steps
    of one row, one for steps of several; its prefills and embeddings are the fused forward's
    (and every step eager where a graph does not fit it)."""

    inner: FusedLlama

    def __init__(self, inner: FusedLlama) -> None:
        self.inner = inner
        self.kind = inner.kind + "+compiled"  # type: ignore[misc]  # per instance: the inner's
        self.graphs: dict[bool, Any] = {}  # several rows? -> the compiled step
        self.prepared = False
        self.off: str | None = "not compiled yet (prepare)"  # why steps run eagerly
        self.steps = 0  # steps run compiled
        self.several = 0  # of them, steps of several rows
        self.misses = 0  # steps run eagerly because the graph did not fit them
        self.compile_s = 0.0
        self.layers = inner.step_layers  # what the one-row step reads (``_plain`` copies)
        # None: its float32 and bfloat16 products run rankone's kernels (else: why not)
        self.one_row: str | None = "not prepared"
        self.head = inner.step_head
        self.extern_layers: list[_Layer] = []  # what the several-row step reads
        self.extern_head: Weight = inner.step_head

    def prepare(self) -> None:
        """Compile both steps on scratch caches, once (the engine's model thread calls it
        before serving); a failure leaves every step eager, with the reason in ``off``."""
        if self.prepared:
            return
        self.prepared = True
        if self.inner.head.device.type != "cpu":
            self._eager("compiled steps run on a CPU (a GPU replays CUDA graphs)")
            return
        start = time.perf_counter()
        # oneDNN's prepacked bfloat16 copies do not lower (inductor asserts): the one-row
        # step's reductions read plain copies of them (the copies hold them where the kernels
        # run: ``Bf16Weight.of``)
        self.layers = [_plain(layer) for layer in self.inner.step_layers]
        self.head = _plain_weight(self.inner.step_head)
        # its products: rankone's own kernels where the forward runs them (float32, bfloat16;
        # 4-bit copies where the CPU has AVX512-BF16)
        self.one_row = None if self.inner.kernels else one_row.load() or "off in this forward"
        if self.one_row is not None:
            log.info("one-row steps keep inductor's reductions: %s", self.one_row)
        try:
            self.extern_layers = [self._extern(layer) for layer in self.inner.step_layers]
            d = self.inner.norm.shape[0]
            self.extern_head = self._extern_weight(self.inner.step_head, d)
            for t in _weights(self):
                torch._dynamo.mark_static(t)
            for several, fn in ((False, self._one_row), (True, self._several_rows)):
                # the step's own guard check (``step``) covers its arguments' sizes, so the
                # graph does not assert them again (~370 asserts a one-row call, ~3 %)
                options = {**_OPTIONS, "guard_filter_fn": _input_guards, "size_asserts": False}
                if not several:
                    options["realize_opcount_threshold"] = _ONE_ROW_REALIZE
                compiled: Any = torch.compile(fn, dynamic=True, fullgraph=True, options=options)
                # in inference mode, as the engine's caches are made and its steps run; its
                # Python floats (norms' eps, the rotation's scale) constants, as the model's
                no_duck = fx_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]
                floats = torch._dynamo.config.patch(specialize_float=True)
                with torch.inference_mode(), no_duck, floats, _stable_graph_names():
                    kv, tokens, positions = self._scratch(_SCRATCH_SEVERAL if several else 1)
                    step = (tokens, positions, kv.mask, kv.keys, kv.values, kv.start, kv.end)
                    graph = compiled.aot_compile((step, {}))
                graph.disable_guard_check()  # ``step`` checks them, to run eagerly instead
                self.graphs[several] = graph
        except Exception as exc:  # no compiler, an unsupported op: eager steps, said once
            self.graphs.clear()
            self._eager(f"compile failed: {type(exc).__name__}: {exc}"[:500])
            return
        self.off = None
        self.compile_s = time.perf_counter() - start
        log.info("decode steps compiled in %.1f s", self.compile_s)

    def _extern_weight(self, weight: Weight, width: int) -> ExternWeight:
        return ExternWeight.of(weight, width, self.inner.products, self.inner.head)

    def _extern(self, layer: _Layer) -> _Layer:
        """``layer`` with its products as extern products (``ExternWeight``)."""
        inner = self.inner
        d, nq = int(inner.norm.shape[0]), inner.heads * inner.head_dim
        gate_up = self._extern_weight(layer.gate_up, d)
        return dataclasses.replace(
            layer,
            qkv=self._extern_weight(layer.qkv, d),
            o=self._extern_weight(layer.o, nq),
            gate_up=gate_up,
            down=self._extern_weight(layer.down, gate_up.out // 2),
        )

    def _eager(self, why: str) -> None:
        """Every step eager from now on, for ``why`` (logged; ``/v1/info`` then reports the
        inner forward's kind)."""
        self.off = why
        self.kind = self.inner.kind  # type: ignore[misc]
        self.layers, self.head = self.inner.step_layers, self.inner.step_head  # no copies kept
        self.extern_layers, self.extern_head = [], self.inner.step_head
        log.warning("decode steps run eagerly: %s", why)

    def _scratch(self, rows: int) -> tuple[SlotKV, Tensor, Tensor]:
        """A slot cache holding ``rows`` admitted rows of ``_SCRATCH_COLUMNS`` columns, their
        next column open, and a step's tokens and positions: what ``prepare`` compiles on."""
        inner = self.inner
        device, dtype = inner.head.device, inner.head.dtype
        kv = SlotKV(len(inner.layers), device, dtype, min_rows=_SCRATCH_SLOTS)
        past = torch.zeros(
            rows, inner.kv_heads, _SCRATCH_COLUMNS, inner.head_dim, dtype=dtype, device=device
        )
        kv.admit([(past, past)] * len(inner.layers), torch.ones(rows, _SCRATCH_COLUMNS))
        kv.open_column()
        tokens = torch.ones(rows, dtype=torch.long, device=device)
        return kv, tokens, tokens * _SCRATCH_COLUMNS

    def step(self, inputs: StepInputs) -> Tensor:
        several = int(inputs.tokens.shape[0]) > 1
        graph = self.graphs.get(several)
        if graph is None or inputs.encoder is not None:
            return self.inner.step(inputs)
        kv = inputs.kv
        step = (inputs.tokens, inputs.positions, kv.mask, kv.keys, kv.values, kv.start, kv.end)
        if not graph.guard_check(self, *step):
            self.misses += 1  # the graph does not fit these inputs: this step eager
            if self.misses == 1:
                log.warning("a decode step ran eagerly (the compiled graph's guards refused it)")
            return self.inner.step(inputs)
        logits = graph(self, *step)
        self.steps += 1
        self.several += several
        return logits

    # two functions, so two code objects: Dynamo keeps each one's graph (and guards) apart
    def _one_row(self, *step: Any) -> Tensor:
        """The traced one-row step (``_traced``'s step arguments): every product rankone's
        kernel where it runs and takes the matrix (``Products.kernel``), else a reduction over
        the weights."""
        how = Products(reduce=True, kernel=self.one_row is None)
        return self._traced(self.layers, self.head, how, *step)

    def _several_rows(self, *step: Any) -> Tensor:
        """The traced step of several rows (their count a symbol): every product extern."""
        return self._traced(self.extern_layers, self.extern_head, Products(), *step)

    def _traced(
        self,
        layers: list[_Layer],
        head: Weight,
        how: Products,
        tokens: Tensor,
        positions: Tensor,
        mask: Tensor,
        keys: Sequence[Tensor],
        values: Sequence[Tensor],
        start: int,
        end: int,
    ) -> Tensor:
        """A step of ``tokens``' rows (slots 0 .. n-1) at the slot cache's write column
        ``end``, attending over ``start .. end``; writes each layer's keys/values there. Its
        products run as ``layers``' weights run them (``Products(reduce=True)``: a plain
        matrix's as a reduction over it)."""
        inner = self.inner
        n = tokens.shape[0]
        x = F.embedding(tokens, inner.embed_tokens.weight)
        window = slice(start, end + 1)

        def attend(i: int, k: Tensor, v: Tensor) -> KV:
            keys[i][:n, :, end : end + 1] = k
            values[i][:n, :, end : end + 1] = v
            return keys[i][:n, :, window], values[i][:n, :, window]

        bias = mask[:n, window][:, None, None, :]
        h = inner._step_layers(x, positions, bias, attend, layers, how)
        return inner._logits(h, head, how)


def _stable_graph_names() -> contextlib.AbstractContextManager[Any]:
    """Dynamo names a precompiled graph ``__compiled_fn_<n>_<uuid4>`` and AOTAutograd's on-disk
    cache keys it by that name (``precompile_backend_id``), so no process found another's
    entries and every start paid the whole compile. While compiling here the names keep their
    counter (unique within the process) without the random part; the graphs are never saved to
    be loaded beside another process's."""
    unique_id = dynamo_output.unique_id

    def stable(name: str, with_uuid: bool = False) -> str:
        return unique_id(name) + ("_rankone" if with_uuid else "")

    return unittest.mock.patch.object(dynamo_output, "unique_id", stable)


def _input_guards(guards: Sequence[Any]) -> list[bool]:
    """Which of Dynamo's guards a compiled step checks (``guard_filter_fn``): those over the
    step's arguments (their dtypes, ranks, the window's bounds and the caches' sizes), not
    those over the forward itself (``self``: its weights, settings and modules, which no one
    changes once it is compiled: ~860 of ~930 guards, 0.15 of 0.2 ms a call) nor over globals;
    and only those a precompiled function can hold (``aot_compile``)."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [
        not (g.is_global or g.guard_type in unsupported or re.search(r"\bself\b", g.name))
        for g in guards
    ]


def _plain_weight(w: Weight) -> Weight:
    return w.plain() if isinstance(w, Bf16Weight) else w


def _each_matrix(layer: _Layer, fn: Callable[[Weight], Weight]) -> _Layer:
    """``layer`` with ``fn`` of each of its four matrices, its other fields shared."""
    return dataclasses.replace(
        layer, qkv=fn(layer.qkv), o=fn(layer.o), gate_up=fn(layer.gate_up), down=fn(layer.down)
    )


def _plain(layer: _Layer) -> _Layer:
    """``layer`` with plain copies of oneDNN's prepacked bfloat16 matrices (``Bf16Weight.plain``:
    about the bfloat16 weights again in memory), its other weights shared."""
    return _each_matrix(layer, _plain_weight)


def _weights(step: CompiledStep) -> list[Tensor]:
    """Every tensor the compiled steps read besides their inputs (weights, norms, the rotary
    tables; an extern product's weights are not read by the graph): marked static, so that
    only the cache's sizes and the rows' count are symbols."""
    inner = step.inner
    found: list[Tensor] = [inner.embed_tokens.weight, inner.norm, inner.head]
    found += [b for b in inner.rotary.buffers()]

    def walk(value: object) -> None:
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, tuple):  # (a 4-bit copy's tiles and their scales)
            for item in value:
                walk(item)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):
                walk(getattr(value, field.name))

    for layer in [*step.layers, *step.extern_layers]:
        walk(layer)
    walk(step.head)
    return found
