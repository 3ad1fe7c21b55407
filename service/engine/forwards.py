"""Which forward runs the backbone: the first implementation that covers it, else HF's own.

Chosen once, when the engine is built (``RANKONE_FUSED_FORWARD=false`` keeps HF's). A new
backend is a ``forward.Forward`` subclass in its own file and one line here.
"""

from __future__ import annotations

from prompts.backbone import Backbone
from service.engine.forward import Forward
from service.engine.fused_llama import FusedLlama
from service.engine.hf_forward import HFForward


def choose_forward(backbone: Backbone, *, fused: bool = True) -> Forward:
    """``fused``: run the fused Llama forward where it covers the backbone."""
    if fused:
        found = FusedLlama.build(backbone.model)
        if found is not None:
            return found
    return HFForward(backbone)
