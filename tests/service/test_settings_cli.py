"""Settings from the environment, auth rules, and ``rankone serve`` refusing bad settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.auth import Role, authorize
from service.errors import ApiError
from service.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_env_prefix_and_key_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKONE_MODEL", "some/model")
    monkeypatch.setenv("RANKONE_CLIENT_KEYS", " a, b ,")
    monkeypatch.setenv("RANKONE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("RANKONE_LOG_LEVEL", "debug")
    s = load_settings(port=9000)
    assert s.client_keys == ["a", "b"] and s.admin_keys == []
    assert (s.max_batch_size, s.port, s.log_level, s.engine) == (7, 9000, "DEBUG", "continuous")


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("RANKONE_MAX_BATCH_SIZE", "0"),
        ("RANKONE_QUEUE_SIZE", "many"),
        ("RANKONE_DTYPE", "float8"),
        ("RANKONE_REDIS_URL", "localhost:6379"),
        ("RANKONE_ENGINE", "turbo"),
        ("RANKONE_DEVICE", "gpu0"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv("RANKONE_MODEL", "m")
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=var):
        load_settings()


def test_model_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANKONE_MODEL", raising=False)
    with pytest.raises(SettingsError, match="RANKONE_MODEL"):
        load_settings()


def test_cli_exits_2_naming_the_variable() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RANKONE_MODEL": "/nowhere",
        "RANKONE_MAX_WAIT_MS": "-5",
    }
    done = subprocess.run(
        [sys.executable, "-m", "rankone_cli", "serve", "--port", "abc"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--port" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "rankone_cli", "serve", "--queue-size", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "RANKONE_MAX_WAIT_MS" in done.stderr and "RANKONE_QUEUE_SIZE" in done.stderr


def test_cli_help_lists_env_vars() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rankone_cli", "serve", "--help"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "RANKONE_REDIS_URL" in done.stdout


KEYS = {"client_keys": ["c1", "c2"], "admin_keys": ["a1"]}


@pytest.mark.parametrize(
    ("header", "role", "status"),
    [
        (None, Role.CLIENT, 401),
        ("Bearer nope", Role.CLIENT, 401),
        ("Basic c1", Role.CLIENT, 401),
        ("Bearer c2", Role.CLIENT, None),
        ("Bearer a1", Role.CLIENT, None),
        ("Bearer c1", Role.ADMIN, 403),
        ("Bearer a1", Role.ADMIN, None),
        ("bearer a1", Role.ADMIN, None),
        (None, Role.ADMIN, 401),
    ],
)
def test_authorize(header: str | None, role: Role, status: int | None) -> None:
    if status is None:
        authorize(header, role, **KEYS)
    else:
        with pytest.raises(ApiError) as err:
            authorize(header, role, **KEYS)
        assert err.value.status == status


def test_no_keys_configured_is_open() -> None:
    authorize(None, Role.CLIENT, client_keys=[], admin_keys=["a"])
    authorize(None, Role.ADMIN, client_keys=["c"], admin_keys=[])


def test_settings_are_frozen() -> None:
    s = Settings(model="m")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        s.port = 1  # type: ignore[misc]
