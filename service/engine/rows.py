"""One request in flight (``Row``) and the loop's phase timings (``LoopStats``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service.engine.base import GenerationRequest, StreamDelta
from service.engine.detok import IncrementalDetokenizer


@dataclass(eq=False)
class Row:
    """One request in flight. ``emit`` receives its deltas (the last one carries the result)."""

    request: GenerationRequest
    emit: Callable[[StreamDelta], None]
    fail: Callable[[BaseException], None] = lambda exc: None
    cancelled: bool = False  # set from any thread; honoured at the next step boundary
    generated: list[int] = field(default_factory=list)
    detok: IncrementalDetokenizer | None = None
    generator: torch.Generator | None = None
    finished: bool = False
    failed: bool = False  # ended with an error: its cache slot may hold non-finite numbers
    limit: int = 0  # new tokens allowed: max_new_tokens, or fewer where positions run out
    # False: only the final delta (with the result) is emitted. A non-streaming request then
    # costs the serving thread one wake-up in all, not one per token (32 per decode step at
    # batch 32), which on a small CPU takes time from the model thread.
    streaming: bool = True

    @property
    def cost(self) -> int:
        """Token budget: prompt rows + input tokens + max new tokens."""
        task = self.request.task
        return (
            int(task.prompt.shape[0])
            + len(self.request.input_ids)
            + self.request.params.max_new_tokens
        )

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class LoopStats:
    """Wall-clock seconds spent by phase (bench figures; no device sync is forced)."""

    compose_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    prefills: int = 0
    generated: int = 0
    input_tokens_reused: int = 0  # input tokens whose KV came from the prefix cache
