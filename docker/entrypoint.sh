#!/bin/sh
# Service entrypoint: with no RANKONE_MODEL given, serve the demo that the compose `init` job
# built into $RANKONE_DEMO_DIR (backbone + artifacts), then run the command (uvicorn by default).
set -eu

demo_dir="${RANKONE_DEMO_DIR:-/var/lib/rankone/demo}"

if [ -z "${RANKONE_MODEL:-}" ]; then
    if [ -f "$demo_dir/.complete" ]; then
        export RANKONE_MODEL="$demo_dir/backbone"
        export RANKONE_SEED_DIR="${RANKONE_SEED_DIR:-$demo_dir/artifacts}"
        echo "rankone-entrypoint: RANKONE_MODEL not set; serving the demo from $demo_dir" >&2
    else
        echo "rankone-entrypoint: RANKONE_MODEL is not set and no demo was found in $demo_dir." >&2
        echo "  Set RANKONE_MODEL (a model directory mounted into the container, or a hub id)," >&2
        echo "  or run the compose 'init' job first (docker compose up does)." >&2
        exit 64
    fi
fi

exec "$@"
