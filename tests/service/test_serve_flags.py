"""``rankone serve``: a flag for every setting, and a bad RANKONE_MODEL named without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

from service.cli import parser
from service.settings import Settings, load_settings
from tests.service.conftest import ROOT


def test_every_setting_is_a_flag() -> None:
    flags = {a.dest for a in parser()._actions if a.option_strings and a.dest != "help"}
    assert flags == set(Settings.model_fields)
    help_text = parser().format_help()
    for name in ("--default-max-new-tokens", "--prefix-cache-bytes", "--max-prompt-length"):
        assert name in help_text


def test_flags_reach_the_settings() -> None:
    argv = [
        "--model=m",
        "--default-max-new-tokens=7",
        "--prefix-cache-bytes=0",
        "--max-prompt-length=9",
        "--client-keys=a,b",
        "--log-level=debug",
        "--max-wait-ms=2.5",
    ]
    overrides = {k: v for k, v in vars(parser().parse_args(argv)).items() if v is not None}
    s = load_settings(**overrides)
    assert (s.default_max_new_tokens, s.prefix_cache_bytes, s.max_prompt_length) == (7, 0, 9)
    assert (s.client_keys, s.log_level, s.max_wait_ms) == (["a", "b"], "DEBUG", 2.5)


def test_missing_model_names_the_variable() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RANKONE_MODEL": "/nope"}
    proc = subprocess.run(
        [sys.executable, "-m", "rankone_cli", "serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "RANKONE_MODEL" in proc.stderr and "/nope" in proc.stderr
    assert "Traceback" not in proc.stderr
