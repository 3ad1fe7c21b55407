"""Decode steps replayed from CUDA graphs: the fused forward's step without the host.

On a GPU an eager decode step of a small model is bound by the host launching its kernels: on
an H200, SmolLM2-135M's fused step takes ~20 ms at any row count with the GPU busy a fifth of
it, and 3.7 ms replayed from a graph (``bench/results/gpu_decode.md``). A graph replays fixed
kernels on fixed addresses, so the step it captures (``FusedLlama.step_full``) has fixed
shapes: it attends over the slot cache's whole capacity (the mask hides what is not a row's
own column, ``kv_cache``'s invariant) and writes its keys/values at a column given as a device
tensor. One graph per (rows, cache buffers): captured the first time a row count is seen on
the current buffers (a few eager steps' time), replayed after; the buffers' reallocation (the
window moving, more slots) drops them. The step's inputs are copied into the graph's own
tensors before each replay, and its logits copied out.

Off a GPU (``capture=False``) the same fixed-shape step runs eagerly: what the CPU tests check
against HF ``generate``. ``choose_forward(graphs=True)`` wraps the fused forward in this on a
CUDA device; the serving engine asks for it unless ``RANKONE_CUDA_GRAPHS=false``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.engine.forward import StepInputs, StepOf
from service.engine.fused_llama import FusedLlama
from service.engine.kv_cache import SlotKV

log = logging.getLogger("rankone.engine")


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    tokens: Tensor  # [n] the graph's own input tensors
    positions: Tensor
    column: Tensor  # [1] the write column
    logits: Tensor  # [n, V] its output


class GraphedStep(StepOf):
    """A fused forward whose decode steps replay CUDA graphs (see module doc); its prefills
    and embeddings are the fused forward's."""

    inner: FusedLlama

    def __init__(self, inner: FusedLlama, *, capture: bool = True) -> None:
        self.inner = inner
        suffix = "+graphs" if capture else "+full"
        self.kind = inner.kind + suffix  # type: ignore[misc]  # per instance: the inner's
        self.capture = capture
        self.graphs: dict[int, _Graph] = {}  # by row count, on ``buffers``
        self.buffers: tuple[int, ...] | None = None  # the slot buffers the graphs read
        self.pool: Any = None
        self.off: str | None = None  # why graphs stopped (a capture failed): eager from then
        self.captures = 0

    def step(self, inputs: StepInputs) -> Tensor:
        kv, n = inputs.kv, int(inputs.tokens.shape[0])
        if not self.capture:
            return self.inner.step_full(inputs.tokens, inputs.positions, kv, n, self._column(kv))
        if self.off is not None:
            return self.inner.step(inputs)
        buffers = (kv.keys[0].data_ptr(), kv.values[0].data_ptr(), kv.mask.data_ptr(), kv.columns)
        if buffers != self.buffers:  # new buffers: the old graphs point at freed memory
            self.graphs.clear()
            # and a new memory pool: the last graph's release frees its pool (a capture into
            # the freed one fails an allocator assertion: seen on an H200, torch 2.11)
            self.pool = None
            self.buffers = buffers
        graph = self.graphs.get(n)
        if graph is None:
            on_gpu = kv.device.type == "cuda"  # (a stand-in capture runs on a CPU in the tests)
            stream = torch.cuda.current_stream(kv.device) if on_gpu else None
            try:
                graph = self._capture(inputs, n, self._column(kv))
            except Exception as exc:  # any capture failure: eager from now on
                self.off = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graphs off, decode steps run eagerly: %s", self.off)
                if stream is not None:
                    recover(kv.device, stream)
                return self.inner.step(inputs)
            self.graphs[n] = graph
        graph.tokens.copy_(inputs.tokens)
        graph.positions.copy_(inputs.positions)
        graph.column.fill_(kv.end)
        graph.graph.replay()
        return graph.logits.clone()

    @staticmethod
    def _column(kv: SlotKV) -> Tensor:
        """The write column as a device tensor [1]."""
        return torch.full((1,), kv.end, dtype=torch.long, device=kv.device)

    def _capture(self, inputs: StepInputs, n: int, column: Tensor) -> _Graph:
        """Capture the fixed-shape step for ``n`` rows on the current buffers. The warm-up
        runs write the same column with the same numbers as the replay that follows."""
        kv: SlotKV = inputs.kv
        tokens, positions = inputs.tokens.clone(), inputs.positions.clone()
        col = column.clone()
        with torch.cuda.device(kv.device):  # the model's GPU, whichever is current
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisations happen outside the graph
                    self.inner.step_full(tokens, positions, kv, n, col)
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.inner.step_full(tokens, positions, kv, n, col)
        self.captures += 1
        return _Graph(graph, tokens, positions, col, logits)


def recover(device: torch.device, stream: torch.cuda.Stream) -> None:
    """What a failed capture on ``device`` leaves behind, undone (torch 2.11, seen on an H100):
    ``torch.cuda.graph`` leaves its capture stream current when ending the capture raises, so
    ``stream``, current before, is made current again; and the device's default generator
    stays marked as being captured (only a capture that ends well unmarks it), after which
    every random draw on the device outside a graph raised "Offset increment outside graph
    capture encountered unexpectedly" (another request's sampling, a fine-tuning step): it
    gets a fresh state with the same seed and offset (a capture after it then works: tested). A
    graph captured earlier keeps the old state object; the decode step draws no random
    numbers, so nothing it replays depends on it."""
    torch.cuda.synchronize(device)
    torch.cuda.set_stream(stream)
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    state = generator.get_state()  # seed and offset (readable: no stream is capturing now)
    generator.graphsafe_set_state(torch.Generator(device=torch.device("cuda", index)))
    generator.set_state(state)
