#!/usr/bin/env bash
# make compose-test: build the stack's images offline and drive `docker-compose up` for real.
#
#   1. installs what is missing (Debian's docker.io, debootstrap, docker-compose; root only);
#   2. starts dockerd when none runs, and stops it (and only it) on exit;
#   3. builds a Debian base image with debootstrap (--variant=minbase, this machine's apt
#      mirror) + `docker import`, once: later runs reuse it (COMPOSE_TEST_REBUILD_BASE=1 redoes it);
#   4. builds the CPU service and trainer images on it (torch's CPU wheel from /opt/wheels is
#      staged in docker/wheels/), and Redis + the proxy from Debian's redis-server and nginx
#      (docker-compose.local.yml) — nothing is pulled from an image registry;
#   5. runs docker/compose_test.py, which brings the stack up and drives it through the
#      proxy's loopback port, then takes it down with its volumes.
# Layers stay in dockerd's cache (/var/lib/docker) between runs on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

export DEBIAN_FRONTEND=noninteractive
# Debian's 20.10 client, matching the daemon (a newer client may be first on PATH), and its
# classic builder: BuildKit would fetch the `# syntax=` frontend image from Docker Hub.
DOCKER=${DOCKER:-/usr/bin/docker}
export DOCKER DOCKER_BUILDKIT=0
TAG=${COMPOSE_TEST_TAG:-compose-test}
BASE_IMAGE=${RANKONE_BASE_IMAGE:-rankone-base:bookworm}
state=$(mktemp -d /tmp/rankone-compose-test.XXXXXX)
start=$SECONDS
started_dockerd=""
staged_wheel=""

say() { printf '\n== %s (%ss)\n' "$*" "$((SECONDS - start))"; }
fail() {
    printf 'compose-test: FAIL: %s\n' "$*" >&2
    exit 1
}

cleanup() {
    local rc=$?
    [ -n "$staged_wheel" ] && rm -f "$staged_wheel"
    if [ -n "$started_dockerd" ]; then
        echo "compose-test: stopping the dockerd it started (pid $started_dockerd)"
        kill -TERM "$started_dockerd" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$started_dockerd" 2>/dev/null && kill -KILL "$started_dockerd" 2>/dev/null
    fi
    rm -rf "$state"
    echo "compose-test: total $((SECONDS - start)) s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM INT  # a signal still runs cleanup (stops the dockerd it started)

# ---- 1. packages --------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
[ -x "$DOCKER" ] || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "missing ${missing[*]}: run as root, or apt-get install them"
    say "installing ${missing[*]} (apt)"
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- 2. dockerd ---------------------------------------------------------------------------
if ! "$DOCKER" info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || fail "no Docker engine runs and only root can start dockerd"
    say "starting dockerd (log: $state/dockerd.log)"
    setsid dockerd >"$state/dockerd.log" 2>&1 &
    started_dockerd=$!
    for _ in $(seq 120); do
        "$DOCKER" info >/dev/null 2>&1 && break
        kill -0 "$started_dockerd" 2>/dev/null || { cat "$state/dockerd.log" >&2; fail "dockerd exited"; }
        sleep 0.5
    done
    "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$state/dockerd.log" >&2; fail "dockerd did not start"; }
fi
"$DOCKER" version --format 'engine {{.Server.Version}}, client {{.Client.Version}}'
docker-compose version --short

# ---- 3. the Debian base image -------------------------------------------------------------
# This machine's Debian mirror: the first apt source of the running release.
debian_mirror() {
    local codename
    codename=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)
    # shellcheck disable=SC2016  # apt's own $(FIELD) placeholders, not shell expansions
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
        | awk -v c="$codename" '$2 == c { print $1; exit }'
}

build_base() {
    local mirror rootfs=$state/rootfs
    mirror=${COMPOSE_TEST_DEBIAN_MIRROR:-$(debian_mirror)}
    [ -n "$mirror" ] || fail "no Debian mirror found in the apt sources (set COMPOSE_TEST_DEBIAN_MIRROR)"
    say "debootstrap --variant=minbase bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$state/debootstrap.log" 2>&1 \
        || { tail -20 "$state/debootstrap.log" >&2; fail "debootstrap"; }
    # As Docker's own Debian images: no service starts at package install, no docs.
    printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
    chmod 0755 "$rootfs/usr/sbin/policy-rc.d"
    printf 'path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\n' \
        >"$rootfs/etc/dpkg/dpkg.cfg.d/01-nodoc"
    # This machine's extra CA certificates (e.g. a TLS-intercepting egress proxy), so that the
    # image builds reach PyPI as the host does: `ca-certificates` (installed by the builds)
    # adds them to the system bundle, which pip is pointed at.
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        mkdir -p "$rootfs/usr/local/share/ca-certificates"
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    fi
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | "$DOCKER" import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

if [ -n "${COMPOSE_TEST_REBUILD_BASE:-}" ] || ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    build_base
    echo "ok: base image $BASE_IMAGE built"
else
    echo "ok: base image $BASE_IMAGE reused (COMPOSE_TEST_REBUILD_BASE=1 to rebuild)"
fi

# ---- 4. images ----------------------------------------------------------------------------
wheel=$(compgen -G '/opt/wheels/torch-*+cpu-cp311-*.whl' | head -1 || true)
if [ -n "$wheel" ]; then
    staged_wheel=$root/docker/wheels/$(basename "$wheel")
    ln -f "$wheel" "$staged_wheel" 2>/dev/null || cp "$wheel" "$staged_wheel"
    echo "staged $(basename "$wheel") in docker/wheels/"
else
    echo "no CPU torch wheel in /opt/wheels: the CPU images take torch from download.pytorch.org"
fi

# build NAME LOG_NAME ARGS...: one image, its output in $state/LOG_NAME.log (shown on failure).
build() {
    local name=$1 log=$state/$2.log t0=$SECONDS
    shift 2
    if ! "$DOCKER" build "$@" >"$log" 2>&1; then
        tail -40 "$log" >&2
        fail "docker build $name"
    fi
    echo "ok: $name built in $((SECONDS - t0)) s ($(grep -c 'Using cache' "$log" || true) cached steps)"
}

say "building images (tag $TAG)"
cpu_args=(--build-arg VARIANT=cpu --build-arg "CPU_BASE_IMAGE=$BASE_IMAGE" --build-arg "CUDA_BASE_IMAGE=$BASE_IMAGE")
build "rankone-trainer:$TAG-cpu" trainer -f docker/Dockerfile.trainer "${cpu_args[@]}" -t "rankone-trainer:$TAG-cpu" .
build "rankone-service:$TAG-cpu" service -f docker/Dockerfile "${cpu_args[@]}" -t "rankone-service:$TAG-cpu" .
# Redis and the proxy need no build context: the Dockerfile comes on stdin.
build "rankone-redis:$TAG-local" redis --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "rankone-redis:$TAG-local" - <docker/Dockerfile.redis
build "rankone-proxy:$TAG-local" proxy --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "rankone-proxy:$TAG-local" - <docker/Dockerfile.proxy
[ -n "$staged_wheel" ] && rm -f "$staged_wheel" && staged_wheel=""

# ---- 5. drive the stack -------------------------------------------------------------------
say "driving the stack (docker/compose_test.py)"
# COMPOSE_TEST_DRIVER: another driver on the same images and arguments (e.g. make
# compose-affinity-bench's `.venv/bin/python -m bench.affinity_compose`).
driver=${COMPOSE_TEST_DRIVER:-/usr/bin/python3 docker/compose_test.py}
# shellcheck disable=SC2086  # the driver is a command line: split on spaces
$driver --tag "$TAG" --workdir "$state/project"
