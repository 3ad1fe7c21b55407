"""A server's max_rank above the artifact format's default (64) holds through the admin API,
not only in the store."""

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from prompts import Backbone
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import ADMIN, ADMIN_KEY, PROMPT_LENGTH, shared_body, shared_prompt


def test_wide_rank_through_api(
    tiny_t5_dir: Path, tmp_path_factory: pytest.TempPathFactory, t5_backbone: Backbone
) -> None:
    settings = Settings(
        model=str(tiny_t5_dir),
        data_dir=str(tmp_path_factory.mktemp("data")),
        admin_keys=[ADMIN_KEY],
        max_rank=100,
        max_body_bytes=16 * 1024 * 1024,
        log_level="WARNING",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.post(
            "/v1/shared-prompts", json=shared_body(shared_prompt(t5_backbone)), headers=ADMIN
        )
        assert r.status_code == 201, r.text
        u = torch.randn(PROMPT_LENGTH, 80)
        v = torch.randn(80, t5_backbone.dim)
        body = {"name": "wide", "shared": "family", "u": u.tolist(), "v": v.tolist()}
        r = c.post("/v1/tasks", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        assert r.json()["rank"] == 80
