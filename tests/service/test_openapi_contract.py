"""The OpenAPI document is the contract: schemathesis fuzzes every documented operation of a
real server (tiny GPT-2, keys configured) and every response must be a documented status with
the documented content type and schema — 0 server errors, 0 schema violations.

Bounded for CI: a fixed number of examples per operation, derandomized (fixed seed).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import schemathesis.specs.openapi.schemas  # loaded at collection, not lazily mid-test
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from tests.service.conftest import (
    ADMIN,
    ServerProcess,
    server_env,
    shared_body,
    shared_prompt,
    task_body,
)

EXAMPLES_PER_OPERATION = 12
# Schema-valid requests may still be refused (422) by checks no schema can state: base64 that
# is not a safetensors blob, factor shapes that do not fit the shared prompt, unknown ids.
# In negative mode, "invalid data must be rejected" is not asked either: the admin key we send
# turns schemathesis' "Authorization missing" negatives back into valid requests. Invalid
# requests are still held to 0 server errors and documented status, type and body; the strict
# typing of bodies (0 is not false, "5" is not 5) is tested in test_validation.py.
EXCLUDED = {
    GenerationMode.POSITIVE: [positive_data_acceptance],
    GenerationMode.NEGATIVE: [positive_data_acceptance, negative_data_rejection],
}


@pytest.fixture(scope="module")
def contract_server(
    tiny_gpt2_dir: Path, gpt2_backbone: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("contract")
    env = server_env(
        tiny_gpt2_dir,
        data_dir=tmp / "data",
        max_new_tokens_limit=8,
        default_max_new_tokens=4,
        max_input_tokens=32,
        max_body_bytes=256 * 1024,
        request_timeout_s=20,
    )
    server = ServerProcess(env, tmp / "server.log").start()
    try:
        sp = shared_prompt(gpt2_backbone)
        httpx.post(f"{server.url}/v1/shared-prompts", json=shared_body(sp), headers=ADMIN)
        for name in ("a", "b"):
            body = task_body(gpt2_backbone, name, seed=ord(name))
            assert httpx.post(f"{server.url}/v1/tasks", json=body, headers=ADMIN).is_success
        yield server
    finally:
        server.stop()


def _fuzz(operation: Any, mode: Any, url: str) -> str | None:
    """Run one operation's examples in one generation mode; the first failure, or None."""

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,  # a fixed seed: the same requests on every run
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        case.call_and_validate(base_url=url, headers=ADMIN, excluded_checks=EXCLUDED[mode])

    try:
        run()
    except Unsatisfiable:  # negative mode, and nothing in the operation can be made invalid
        return None
    except BaseException as exc:
        return f"{operation.label} [{mode.value}]: {exc}"
    return None


def test_every_response_matches_the_document(contract_server: ServerProcess) -> None:
    """Positive (valid) and negative (invalid) requests for every operation: each answer is a
    documented status, content type and body (no 5xx at all)."""
    api = schemathesis.openapi.from_url(f"{contract_server.url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 14
    failures = [
        failure
        for operation in operations
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        if (failure := _fuzz(operation, mode, contract_server.url)) is not None
    ]
    assert not failures, "\n\n".join(failures)


STREAMS = [
    ("/v1/tasks/{task}/generate", {"task": "a"}, {"inputs": "hello", "stream": True}),
    ("/v1/completions", {}, {"model": "a", "prompt": "hello", "stream": True, "max_tokens": 3}),
]  # chat streams are read against the document in tests/service/test_chat.py (chat model)


@pytest.mark.parametrize(("path", "params", "body"), STREAMS)
def test_stream_events_match_the_document(
    contract_server: ServerProcess, path: str, params: dict[str, str], body: dict[str, Any]
) -> None:
    """Each route's server-sent events are described (itemSchema: each event's data as JSON of
    a named model), so schemathesis reads them against the document like a JSON body; an
    event that does not match fails here."""
    api = schemathesis.openapi.from_url(f"{contract_server.url}/openapi.json")
    operation = api[path]["POST"]
    media = operation.definition.raw["responses"]["200"]["content"]["text/event-stream"]
    assert "itemSchema" in media
    case = operation.Case(body=body, path_parameters=params, media_type="application/json")
    response = case.call_and_validate(
        base_url=contract_server.url, headers=ADMIN, excluded_checks=[positive_data_acceptance]
    )
    assert response.headers["content-type"][0].startswith("text/event-stream")
    assert response.text.count("data:") >= 2


def test_a_bad_event_would_be_caught(contract_server: ServerProcess) -> None:
    """The check has teeth: an event whose data breaks its model fails validation."""
    from schemathesis.checks import response_schema_conformance
    from schemathesis.core.transport import Response

    api = schemathesis.openapi.from_url(f"{contract_server.url}/openapi.json")
    operation = api["/v1/tasks/{task}/generate"]["POST"]
    case = operation.Case(body={"inputs": "x", "stream": True}, path_parameters={"task": "a"})
    bad = httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=b'event: token\ndata: {"text": 5, "token_ids": []}\n\n',
        request=httpx.Request("POST", f"{contract_server.url}/v1/tasks/a/generate"),
    )
    bad.elapsed = datetime.timedelta(seconds=0.1)
    with pytest.raises(BaseException, match=r"(?i)schema"):
        case.validate_response(Response.from_any(bad), checks=[response_schema_conformance])
