"""The client's pure parts: SSE decoding, error mapping, artifact directories without torch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.artifacts import ArtifactReadError, read_artifact_dir, same_tensors
from client.errors import (
    APIError,
    ConflictError,
    InvalidRequestError,
    RateLimitError,
    ServerError,
    error_from,
)
from client.sse import SSEDecoder
from prompts import SharedPrompt, TaskFactors, encode_task, save_shared, save_task


def decode(lines: list[str]) -> list[object]:
    decoder = SSEDecoder()
    return [e for e in (decoder.feed(line) for line in lines) if e is not None]


def test_sse_events_pings_and_done() -> None:
    events = decode(
        [
            ": ping",
            "event: token",
            'data: {"text": "ab", "token_ids": [1, 2]}',
            "",
            "",
            "event: done",
            'data: {"text": "ab", "finish_reason": "stop", "prompt_tokens": 3,',
            'data: "completion_tokens": 2}',
            "",
        ]
    )
    assert [e.event for e in events] == ["token", "done"]  # type: ignore[attr-defined]
    assert events[0].token_ids == [1, 2]  # type: ignore[attr-defined]
    assert events[1].output.completion_tokens == 2  # type: ignore[attr-defined]


def test_sse_error_event_raises_its_typed_error() -> None:
    body = '{"error": {"code": "queue_full", "message": "busy"}}'
    with pytest.raises(RateLimitError) as e:
        decode(["event: error", f"data: {body}", ""])
    assert (e.value.status, e.value.code, e.value.message) == (None, "queue_full", "busy")


@pytest.mark.parametrize(
    ("status", "body", "cls", "code"),
    [
        (
            422,
            {"error": {"code": "invalid_request", "message": "x"}},
            InvalidRequestError,
            "invalid_request",
        ),
        (
            409,
            {"error": {"code": "backbone_mismatch", "message": "x"}},
            ConflictError,
            "backbone_mismatch",
        ),
        (
            503,
            {"error": {"code": "store_unavailable", "message": "x"}},
            ServerError,
            "store_unavailable",
        ),
        (502, None, ServerError, "http_error"),  # a proxy's HTML page, not our JSON
        (418, {"unexpected": 1}, APIError, "http_error"),
    ],
)
def test_error_mapping(status: int, body: object, cls: type, code: str) -> None:
    err = error_from(status, body, {"retry-after": "2"}, "<html>bad gateway</html>")
    assert type(err) is cls and err.code == code and err.status == status


def test_retry_after() -> None:
    err = error_from(429, {"error": {"code": "queue_full", "message": "m"}}, {"retry-after": "3"})
    assert isinstance(err, RateLimitError) and err.retry_after == 3.0


def test_artifact_dir_read_without_torch_and_compared_by_tensors(tmp_path: Path) -> None:
    save_shared(tmp_path, SharedPrompt("sp", torch.ones(2, 4), "fp"))
    tf = TaskFactors(
        "t", "sp", torch.ones(2, 1), torch.ones(1, 4), "fp", created="2020-01-01T00:00:00Z"
    )
    save_task(tmp_path, tf)
    found = read_artifact_dir(tmp_path)
    assert [a.name for a in found.shared] == ["sp"] and found.tasks[0].shared == "sp"
    later = encode_task(TaskFactors("t", "sp", torch.ones(2, 1), torch.ones(1, 4), "fp"))
    assert later != found.tasks[0].blob and same_tensors(later, found.tasks[0].blob)
    other = encode_task(TaskFactors("t", "sp", torch.ones(2, 1), torch.zeros(1, 4), "fp"))
    assert not same_tensors(other, found.tasks[0].blob)
    (tmp_path / "tasks" / "t.safetensors").rename(tmp_path / "tasks" / "renamed.safetensors")
    with pytest.raises(ArtifactReadError, match=r"must be named t\.safetensors"):
        read_artifact_dir(tmp_path)
