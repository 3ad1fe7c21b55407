"""Which forward runs the backbone: the first implementation that covers it, else HF's own.

Chosen once, when the engine is built (``RANKONE_FUSED_FORWARD=false`` keeps HF's). A new
backend is a ``forward.Forward`` subclass in its own file and one line here.
"""

from __future__ import annotations

from prompts.backbone import Backbone
from service.engine.compiled_step import CompiledStep
from service.engine.forward import Forward
from service.engine.fused_llama import FusedLlama, packing_available
from service.engine.graphed import GraphedStep
from service.engine.hf_forward import HFForward

WEIGHTS = ("float32", "int8", "int4", "bfloat16", "float32-packed")  # RANKONE_WEIGHTS


def choose_forward(
    backbone: Backbone,
    *,
    fused: bool = True,
    weights: str = "float32",
    graphs: bool = False,
    compiled: bool = False,
    kernels: bool = True,
) -> Forward:
    """``fused``: run the fused Llama forward where it covers the backbone. ``weights``
    ``int8`` / ``int4`` / ``bfloat16``: its decode steps' products from 8-bit / 4-bit /
    bfloat16 copies (``FusedLlamaInt8``, ``FusedLlamaInt4``, ``FusedLlamaBf16``),
    ``float32-packed`` from oneDNN's or MKL's packed float32 copies where measured faster
    (``FusedLlamaPacked``, a CPU's), which only the fused forward has: a ValueError where it
    does not run. ``graphs``: on a CUDA device the fused forward's decode steps replay CUDA
    graphs (``graphed.GraphedStep``, one per forward; elsewhere no effect; the serving engine
    passes ``RANKONE_CUDA_GRAPHS``, on by default). ``compiled``: on a CPU the fused
    forward's decode steps run compiled by inductor (``compiled_step.CompiledStep``,
    compiled by its ``prepare``; ``RANKONE_COMPILED_STEP``, off by default; a ValueError
    without the fused forward). ``kernels``: false turns rankone's own CPU kernels off in the
    fused forward (``FusedLlama.without_kernels``; ``RANKONE_CPU_KERNELS``, on by default)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    found = FusedLlama.build(backbone.model) if fused else None
    if weights != "float32":
        if found is None:
            why = "RANKONE_FUSED_FORWARD is false" if not fused else "this backbone is not covered"
            raise ValueError(
                f"RANKONE_WEIGHTS={weights} needs the engine's fused Llama forward, and "
                f"{why} (the log says why): use RANKONE_WEIGHTS=float32"
            )
        why_not = packing_available(backbone.device) if weights == "float32-packed" else None
        if why_not is not None:
            raise ValueError(f"RANKONE_WEIGHTS={weights}: {why_not}; use RANKONE_WEIGHTS=float32")
        found = found.decode_copies(weights)
    if not kernels and found is not None:
        found = found.without_kernels()
    if compiled and found is None:
        why = "RANKONE_FUSED_FORWARD is false" if not fused else "this backbone is not covered"
        raise ValueError(
            f"RANKONE_COMPILED_STEP compiles the engine's fused Llama forward, and {why} "
            "(the log says why): use RANKONE_COMPILED_STEP=false"
        )
    if found is None:
        return HFForward(backbone)
    if compiled and backbone.device.type == "cpu":
        return CompiledStep.of(found)
    if graphs and backbone.device.type == "cuda":
        return GraphedStep.of(found)
    return found
