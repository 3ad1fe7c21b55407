"""One-row decode steps compiled by inductor: the fused forward's step without its operator calls.

A decode step with one running request reads every weight once for one row of activations. On a
CPU the eager fused step spends half of it outside its products: ~600 operator calls at ~7 µs
each (norms, rotations, attention, residuals) and products whose one-row kernels run at half the
memory's rate (``torch._weight_int8pack_mm`` reads 8-bit weights at ~14 GB/s on an AMD EPYC, a
fused reduction at ~27 GB/s). ``torch.compile`` (inductor's C++ backend) turns the whole
one-row step into a few C++ loops: every product a reduction over the weights fused with its
dequantization, its norm and the elementwise work around it, the attention over the window as
two fused reductions. On SmolLM2-135M in ``int8`` (AMD EPYC, 2 threads) a one-row forward takes
~6.5 ms against ~14 ms eager; one sequence decodes 113 tokens/s against 64
(``bench/results/peer_llamacpp.md``).

What is compiled is ``FusedLlama._step_layers`` itself with ``Products(reduce=True)``: the
same code, so the same numbers up to the order of each sum (each low-precision product rounds
as its eager kernel does: bfloat16 activations, an int8 product's output in bfloat16). Steps of
more rows run eagerly: a reduction reads the weights once per row, where a GEMM reads them once.

One graph serves every step: the window's bounds, the slot cache's size and the rows' capacity
are symbols (``dynamic=True``; the model's weights and head sizes are static). It is compiled
before serving (``prepare``, on a scratch cache whose sizes are not 0, 1 nor each other, so that
no size is specialised): 1.5-2.5 minutes for SmolLM2 on 2 cores the first time on a machine,
about one after (inductor's on-disk cache, ``TORCHINDUCTOR_CACHE_DIR``; Dynamo's tracing is
paid by every process). ``bfloat16``'s copies are oneDNN's
prepacked layout, which inductor cannot lower: its compiled step reads plain bfloat16 copies of
them (``_plain``: the bfloat16 weights again in memory). A step that would need another graph
(or a compile that fails: no C++ compiler) runs eagerly instead, counted in ``misses`` and
logged, never compiled while serving. CPU only: on a GPU the decode step replays CUDA graphs
(``graphed.GraphedStep``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
from torch import Tensor

from service.engine.forward import StepInputs, StepOf
from service.engine.fused_llama import Bf16Weight, FusedLlama, Products, Weight, _Layer
from service.engine.kv_cache import SlotKV
from service.engine.kv_layout import KV

log = logging.getLogger("rankone.engine")
# inductor's options for this graph: every elementwise result is its own buffer (without it a
# product's loop recomputes its input's norm for every weight row: half the speed), and casts
# to bfloat16 round as they do eagerly (the eager kernels' numbers)
_OPTIONS: dict[str, Any] = {"realize_opcount_threshold": 0, "emulate_precision_casts": True}
_ROWS = 1  # the row count compiled
# prepare's scratch cache: 9 row slots, one row of 65 columns (its window then starts at column
# 64, ends at 129, in 256 columns): no size 0, 1 or another's (see module doc)
_SCRATCH_ROWS, _SCRATCH_COLUMNS = 9, 65


class CompiledStep(StepOf):
    """A fused forward whose one-row decode steps run compiled (see module doc); its other
    steps, prefills and embeddings are the fused forward's."""

    inner: FusedLlama

    def __init__(self, inner: FusedLlama) -> None:
        self.inner = inner
        self.kind = inner.kind + "+compiled"  # type: ignore[misc]  # per instance: the inner's
        self.compiled: Any = None
        self.prepared = False
        self.off: str | None = "not compiled yet (prepare)"  # why steps run eagerly
        self.steps = 0  # one-row steps run compiled
        self.misses = 0  # one-row steps run eagerly because the graph did not fit them
        self.compile_s = 0.0
        self.layers = inner.step_layers  # what the compiled step reads (``_plain`` copies)
        self.head = inner.step_head

    def prepare(self) -> None:
        """Compile the one-row step on a scratch cache, once (the engine's model thread calls
        it before serving); a failure leaves every step eager, with the reason in ``off``."""
        if self.prepared:
            return
        self.prepared = True
        if self.inner.head.device.type != "cpu":
            self._eager("compiled steps run on a CPU (a GPU replays CUDA graphs)")
            return
        start = time.perf_counter()
        # oneDNN's prepacked bfloat16 copies do not lower (inductor asserts): the compiled
        # step reads plain copies of them
        self.layers = [_plain(layer) for layer in self.inner.step_layers]
        self.head = _plain_weight(self.inner.step_head)
        try:
            for t in _weights(self):
                torch._dynamo.mark_static(t)
            compiled = torch.compile(self._one_row, dynamic=True, fullgraph=True, options=_OPTIONS)
            # in inference mode, as the engine's caches are made and its steps run
            no_duck = fx_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]
            with torch.inference_mode(), no_duck:
                kv, tokens, positions = self._scratch()
                compiled(tokens, positions, kv.mask, kv.keys, kv.values, kv.start, kv.end)
        except Exception as exc:  # no compiler, an unsupported op: eager steps, said once
            self._eager(f"compile failed: {type(exc).__name__}: {exc}"[:500])
            return
        self.compiled, self.off = compiled, None
        self.compile_s = time.perf_counter() - start
        log.info("one-row decode step compiled in %.1f s", self.compile_s)

    def _eager(self, why: str) -> None:
        """Every step eager from now on, for ``why`` (logged; ``/v1/info`` then reports the
        inner forward's kind)."""
        self.off = why
        self.kind = self.inner.kind  # type: ignore[misc]
        self.layers, self.head = self.inner.step_layers, self.inner.step_head  # no copies kept
        log.warning("one-row decode steps run eagerly: %s", why)

    def _scratch(self) -> tuple[SlotKV, Tensor, Tensor]:
        """A slot cache holding one admitted row of ``_SCRATCH_COLUMNS`` columns, its next
        column open, and a step's token and position: what ``prepare`` compiles on."""
        inner = self.inner
        device, dtype = inner.head.device, inner.head.dtype
        kv = SlotKV(len(inner.layers), device, dtype, min_rows=_SCRATCH_ROWS)
        past = torch.zeros(
            1, inner.kv_heads, _SCRATCH_COLUMNS, inner.head_dim, dtype=dtype, device=device
        )
        kv.admit([(past, past)] * len(inner.layers), torch.ones(1, _SCRATCH_COLUMNS))
        kv.open_column()
        token = torch.ones(1, dtype=torch.long, device=device)
        return kv, token, token * _SCRATCH_COLUMNS

    def step(self, inputs: StepInputs) -> Tensor:
        n = int(inputs.tokens.shape[0])
        if n != _ROWS or self.compiled is None or inputs.encoder is not None:
            return self.inner.step(inputs)
        kv = inputs.kv
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                logits = self.compiled(
                    inputs.tokens, inputs.positions, kv.mask, kv.keys, kv.values, kv.start, kv.end
                )
        except RuntimeError as exc:
            if not _refused(exc):
                raise
            self.misses += 1  # the graph does not fit these inputs: this step eager
            if self.misses == 1:
                log.warning("a one-row step ran eagerly (the compiled graph did not fit): %s", exc)
            return self.inner.step(inputs)
        self.steps += 1
        return logits

    def _one_row(
        self,
        tokens: Tensor,
        positions: Tensor,
        mask: Tensor,
        keys: Sequence[Tensor],
        values: Sequence[Tensor],
        start: int,
        end: int,
    ) -> Tensor:
        """The traced step: one row (slot 0) at the slot cache's write column ``end``,
        attending over ``start .. end``; writes each layer's keys/values there."""
        inner = self.inner
        x = F.embedding(tokens, inner.embed_tokens.weight)
        window = slice(start, end + 1)

        def attend(i: int, k: Tensor, v: Tensor) -> KV:
            keys[i][:_ROWS, :, end : end + 1] = k
            values[i][:_ROWS, :, end : end + 1] = v
            return keys[i][:_ROWS, :, window], values[i][:_ROWS, :, window]

        bias = mask[:_ROWS, window][:, None, None, :]
        how = Products(reduce=True)
        h = inner._step_layers(x, positions, bias, attend, self.layers, how)
        return inner._logits(h, self.head, how)


def _refused(exc: RuntimeError) -> bool:
    """Whether ``exc`` is the compiled graph's guards refusing a call (it would recompile)."""
    return isinstance(exc, torch._dynamo.exc.RecompileError) or str(exc).startswith(
        "Detected recompile"
    )


def _plain_weight(w: Weight) -> Weight:
    return w.plain() if isinstance(w, Bf16Weight) else w


def _plain(layer: _Layer) -> _Layer:
    """``layer`` with plain copies of oneDNN's prepacked bfloat16 matrices (``Bf16Weight.plain``:
    about the bfloat16 weights again in memory), its other weights shared."""
    return dataclasses.replace(
        layer,
        qkv=_plain_weight(layer.qkv),
        o=_plain_weight(layer.o),
        gate_up=_plain_weight(layer.gate_up),
        down=_plain_weight(layer.down),
    )


def _weights(step: CompiledStep) -> list[Tensor]:
    """Every tensor the one-row step reads besides its inputs (weights, norms, the rotary
    tables): marked static, so that only the cache's sizes are symbols."""
    inner = step.inner
    found: list[Tensor] = [inner.embed_tokens.weight, inner.norm, inner.head]
    found += [b for b in inner.rotary.buffers()]

    def walk(value: object) -> None:
        if isinstance(value, Tensor):
            found.append(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):
                walk(getattr(value, field.name))

    for layer in step.layers:
        walk(layer)
    walk(step.head)
    return found
