"""Session-wide fixtures: tiny local models (built once) and a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.tiny_models import BUILDERS


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run the tiny models on one intra-op thread, restoring the setting afterwards.

    The models are so small that extra threads only add synchronisation; on a loaded machine
    with two cores they made the tests three times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build(root / kind) for kind, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def tiny_t5_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["t5"]


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["gpt2"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server for the session, on a free port; tests may stop/restart it."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """A clean database for each test on the session's redis-server."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flushall()
    return redis_server.url
