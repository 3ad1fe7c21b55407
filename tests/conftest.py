"""Session-wide fixtures: tiny local models (built once) and a real redis-server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_models import BUILDERS


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
