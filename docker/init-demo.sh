#!/bin/sh
# One-shot compose `init` job: build the offline demo (backbone + artifacts) into
# $RANKONE_DEMO_DIR unless a model is configured or the demo is already there. Idempotent.
set -eu

demo_dir="${RANKONE_DEMO_DIR:-/var/lib/rankone/demo}"

if [ -n "${RANKONE_MODEL:-}" ]; then
    echo "init: RANKONE_MODEL is set ($RANKONE_MODEL); the demo is not needed."
    exit 0
fi
if [ -f "$demo_dir/.complete" ]; then
    echo "init: demo already built in $demo_dir; nothing to do."
    exit 0
fi

echo "init: building the demo backbone and prompts into $demo_dir (offline, a few minutes on CPU)"
mkdir -p "$demo_dir"
# RANKONE_DEMO_ARGS: extra `rankone demo` options, split on spaces (e.g. a smaller budget).
# shellcheck disable=SC2086
rankone demo --no-serve --cache-dir "$demo_dir" ${RANKONE_DEMO_ARGS:-}
for required in "$demo_dir/backbone" "$demo_dir/artifacts"; do
    if [ ! -d "$required" ]; then
        echo "init: 'rankone demo' finished but $required is missing" >&2
        exit 1
    fi
done
# Written last, so a job killed half way is rebuilt on the next start rather than served.
touch "$demo_dir/.complete"
echo "init: demo ready in $demo_dir"
