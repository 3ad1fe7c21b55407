"""``rankone serve``: run the HTTP server. Flags override ``RANKONE_*`` environment settings.

The flags are generated from ``Settings`` (one ``--flag`` per field), so every setting is
both an environment variable and a flag and the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any

from pydantic.fields import FieldInfo

from prompts.errors import RankoneError
from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings


def _flag_kind(field: FieldInfo) -> dict[str, Any]:
    """argparse keyword arguments for one settings field (pydantic validates the value)."""
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is typing.Literal:
        choices = ",".join(str(c) for c in typing.get_args(annotation))
        return {"type": str, "metavar": f"{{{choices}}}"}
    if annotation in (int, float):
        return {"type": annotation}
    return {"type": str}  # str, and comma-separated lists (client_keys, admin_keys)


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value in ("", [], None):
        return ""
    return f"; default {','.join(value) if isinstance(value, list) else value}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rankone serve",
        description="Serve many tasks from one frozen transformer. Every option can also be set "
        f"as an environment variable {ENV_PREFIX}<OPTION> (e.g. {ENV_PREFIX}REDIS_URL); a flag "
        "wins over the environment.",
    )
    for name, field in Settings.model_fields.items():
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=None,
            help=f"{field.description or ''} [env {ENV_PREFIX}{name.upper()}{_default(field)}]",
            **_flag_kind(field),
        )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = load_settings(**overrides)
    except SettingsError as e:
        print(f"rankone serve: {e}", file=sys.stderr)
        return 2
    from prompts.backbone import load_backbone
    from service.engine.threads import reserve_for_model

    reserve_for_model()  # this thread serves HTTP: torch's threads go to the model thread
    try:
        backbone = load_backbone(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            gguf_cache_dir=settings.gguf_cache_dir or None,
        )
    except RankoneError as e:
        print(
            f"rankone serve: {ENV_PREFIX}MODEL (--model) = {settings.model!r}: {e}\n"
            "  expected a local model directory, a .gguf file or a hub id",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from service.app import create_app
    from service.logging import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    app.state.logging_ready = True
    app.state.preloaded_backbone = backbone
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout_s),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
