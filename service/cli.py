"""``rankone serve``: run the HTTP server. Flags override ``RANKONE_*`` environment settings."""

from __future__ import annotations

import argparse
import sys

from service.settings import Settings, SettingsError, load_settings

_FLAGS = {
    "model": str,
    "gguf_cache_dir": str,
    "device": str,
    "dtype": str,
    "redis_url": str,
    "data_dir": str,
    "seed_dir": str,
    "engine": str,
    "max_batch_size": int,
    "max_batch_tokens": int,
    "max_wait_ms": float,
    "max_input_tokens": int,
    "max_new_tokens_limit": int,
    "queue_size": int,
    "request_timeout_s": float,
    "device_cache_bytes": int,
    "max_rank": int,
    "max_body_bytes": int,
    "client_keys": str,
    "admin_keys": str,
    "log_level": str,
    "log_format": str,
    "host": str,
    "port": int,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rankone serve",
        description="Serve many tasks from one frozen transformer. Every option can also be set "
        "as an environment variable RANKONE_<OPTION> (e.g. RANKONE_REDIS_URL).",
    )
    fields = Settings.model_fields
    for name, kind in _FLAGS.items():
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            default=None,
            help=f"{fields[name].description or ''} [env RANKONE_{name.upper()}]",
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
    import uvicorn

    from service.app import create_app
    from service.logging import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    app.state.logging_ready = True
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
