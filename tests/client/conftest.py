"""One real ``rankone serve`` (tiny T5, embedded store, admin + client keys) for the client
tests; each test uses its own task and shared-prompt names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from client import Client
from prompts import Backbone
from prompts import load_backbone as _load
from tests.service.conftest import ADMIN_KEY, ServerProcess, server_env


@pytest.fixture(scope="session")
def t5(tiny_t5_dir: Path) -> Backbone:
    return _load(tiny_t5_dir)


@pytest.fixture(scope="session")
def server(tiny_t5_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("client-server")
    env = server_env(tiny_t5_dir, data_dir=root / "store", max_wait_ms=1)
    proc = ServerProcess(env, root / "server.log").start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def admin(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url, key=ADMIN_KEY, timeout=30) as c:
        yield c
