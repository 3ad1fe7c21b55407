"""The engine interface: what the HTTP layer may ask of an engine, and nothing about HTTP.

The event loop only enqueues and awaits; one worker owns the model. An engine receives
requests that are already tokenized and whose task factors are already resolved (on the
model's device) by the factor store, and returns generated text with finish reasons.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from service.core.tasks import ResolvedTask

# OpenAI semantics: "stop" covers both EOS and a stop sequence.
FinishReason = Literal["stop", "length", "cancelled"]


class QueueFullError(RuntimeError):
    """The bounded queue is full: the caller should answer 429 with Retry-After."""

    def __init__(self, depth: int, retry_after_s: float = 1.0) -> None:
        super().__init__(f"the request queue is full ({depth} waiting); retry later")
        self.depth = depth
        self.retry_after_s = retry_after_s


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests (→ 503)."""


# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by a
# tinier temperature overflows them to inf, and the distribution is one-hot anyway.
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # generate to max_new_tokens past EOS (vLLM's ignore_eos: benchmarks with fixed lengths)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


@dataclass
class GenerationRequest:
    request_id: str
    task: ResolvedTask
    input_ids: list[int]  # tokenized input, no prompt rows; special tokens as the model wants
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int  # input tokens (the soft prompt's L rows not counted)
    completion_tokens: int


@dataclass
class StreamDelta:
    """One streamed step: new text (may be empty while a multi-byte char is incomplete).

    The last delta of a stream carries ``result`` (the whole result, with finish reason).
    """

    text: str
    token_ids: list[int]
    result: GenerationResult | None = None


class Engine(abc.ABC):
    """Owns the model; batches waiting requests of any task into the same forward passes."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the worker (called once, from the app's lifespan)."""

    @abc.abstractmethod
    async def shutdown(self, *, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests (EngineClosedError), let in-flight ones finish, stop the worker."""

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run one request to completion. Raises QueueFullError / EngineClosedError."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Yield deltas as tokens are generated; closing the iterator cancels the request
        (its batch row is freed at the next step boundary)."""

    def on_store_event(self, event: Any) -> None:  # noqa: B027 - optional hook, no-op default
        """A factor-store write event; engines that cache per-task state drop it here."""

    @property
    @abc.abstractmethod
    def queue_depth(self) -> int:
        """Requests waiting to be admitted."""

    @property
    @abc.abstractmethod
    def running(self) -> int:
        """Requests currently in the running batch."""
