"""Engines: own the model, batch requests of any task into the same forward passes."""

from service.engine.base import (
    Engine,
    EngineClosedError,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    QueueFullError,
    ResolvedTask,
    SamplingParams,
    StreamDelta,
)

__all__ = [
    "Engine",
    "EngineClosedError",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "QueueFullError",
    "ResolvedTask",
    "SamplingParams",
    "StreamDelta",
]
