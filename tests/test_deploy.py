"""Deployment files: compose structure, Redis durability, image hygiene, documented settings.

Cheap, engine-free checks; `docker/check.sh` adds `docker-compose config`, hadolint, `nginx -t`
and a clean-venv install of the images' dependency set.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.trainer"]

_spec = importlib.util.spec_from_file_location("compose_v1_reset", DOCKER / "compose_v1_reset.py")
assert _spec is not None and _spec.loader is not None
compose_v1_reset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compose_v1_reset)
ResetLoader = compose_v1_reset.ResetLoader
split_resets = compose_v1_reset.split_resets


def load_compose(name: str) -> dict[str, Any]:
    return yaml.load((ROOT / name).read_text(), Loader=ResetLoader)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose("docker-compose.yml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def env_example_names() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#?\s*(RANKONE_[A-Z0-9_]+)=", text, flags=re.MULTILINE))


# ---- compose ---------------------------------------------------------------------------------


def test_compose_has_the_four_services(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "init", "service", "proxy"}


def test_redis_is_durable_and_healthchecked(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert re.fullmatch(r"redis:7(\.\d+)*(-[a-z0-9]+)?", redis["image"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "redis-data:/data" in redis["volumes"]
    assert "./docker/redis.conf:/usr/local/etc/redis/redis.conf:ro" in redis["volumes"]
    assert "/usr/local/etc/redis/redis.conf" in redis["command"]
    assert "ports" not in redis, "Redis runs without a password: never publish its port"


def test_service_waits_for_redis_and_the_init_job(services: dict[str, Any]) -> None:
    assert services["service"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "init": {"condition": "service_completed_successfully"},
    }
    assert services["proxy"]["depends_on"] == {"service": {"condition": "service_healthy"}}


def test_service_reserves_one_nvidia_gpu(services: dict[str, Any]) -> None:
    devices = services["service"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_service_builds_the_service_image_and_checks_readiness(services: dict[str, Any]) -> None:
    service = services["service"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert service["build"]["args"]["VARIANT"] == "cuda"
    assert service["env_file"] == ".env"
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert "ports" not in service, "a fixed host port breaks `--scale service=N`"
    assert service["expose"] == ["8000"]
    assert services["proxy"]["ports"] == [
        "${RANKONE_BIND_ADDRESS:-0.0.0.0}:${RANKONE_HOST_PORT:-8000}:8000"
    ]


def test_admin_key_is_required(services: dict[str, Any]) -> None:
    admin = services["service"]["environment"]["RANKONE_ADMIN_KEYS"]
    assert admin.startswith("${RANKONE_ADMIN_KEYS:?"), admin


def test_init_job_builds_the_demo_into_the_shared_volume(services: dict[str, Any]) -> None:
    init = services["init"]
    assert init["build"]["dockerfile"] == "docker/Dockerfile.trainer"
    assert init["command"] == ["rankone-init-demo"]
    assert init["restart"] == "no"
    assert "demo:/var/lib/rankone/demo" in init["volumes"]
    assert "demo:/var/lib/rankone/demo:ro" in services["service"]["volumes"]


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = {
        volume.split(":", 1)[0]
        for service in compose["services"].values()
        for volume in service.get("volumes", [])
        if not volume.startswith((".", "/"))
    }
    assert used == declared == {"redis-data", "demo", "hf-cache"}


def test_cpu_override_drops_the_gpu_and_builds_cpu_images(compose: dict[str, Any]) -> None:
    base = yaml.load((ROOT / "docker-compose.yml").read_text(), Loader=ResetLoader)
    override = load_compose("docker-compose.cpu.yml")
    split_resets(base, override)
    assert "deploy" not in base["services"]["service"]
    assert override["services"]["service"]["build"]["args"]["VARIANT"] == "cpu"
    assert override["services"]["init"]["build"]["args"]["VARIANT"] == "cpu"
    assert override["services"]["service"]["environment"]["RANKONE_DEVICE"] == "cpu"
    # The reset touched nothing else of the base.
    assert base["services"]["service"]["depends_on"] == compose["services"]["service"]["depends_on"]


def test_env_example_lists_every_variable_compose_uses() -> None:
    text = "\n".join(
        (ROOT / name).read_text()
        for name in ("docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.local.yml")
    )
    used = set(re.findall(r"\b(RANKONE_[A-Z0-9_]+)\b", text))
    missing = used - env_example_names()
    assert not missing, f"add to .env.example: {sorted(missing)}"


def test_env_example_lists_every_server_setting() -> None:
    from service.settings import ENV_PREFIX, Settings

    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    missing = settings - env_example_names()
    assert not missing, f"add to .env.example: {sorted(missing)}"


def test_env_example_leaves_the_admin_key_for_the_user_to_set() -> None:
    assert re.search(r"^RANKONE_ADMIN_KEYS=$", (ROOT / ".env.example").read_text(), re.MULTILINE)


# ---- redis.conf ------------------------------------------------------------------------------


def redis_directives() -> dict[str, str]:
    lines = (DOCKER / "redis.conf").read_text().splitlines()
    pairs = (line.split(None, 1) for line in lines if line.strip() and not line.startswith("#"))
    return {key.lower(): value.strip() for key, value in pairs}


def test_redis_conf_is_durable_and_never_evicts() -> None:
    conf = redis_directives()
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["dir"] == "/data"
    assert conf["maxmemory-policy"] == "noeviction"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_conf_is_accepted_by_redis_server(tmp_path: Path) -> None:
    from tests.redis_server import free_port

    conf = tmp_path / "redis.conf"
    text = (DOCKER / "redis.conf").read_text()
    conf.write_text(text.replace("\ndir /data\n", f"\ndir {tmp_path}\n"))
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", str(conf), "--port", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        import redis

        client = redis.Redis(port=port, socket_connect_timeout=5, decode_responses=True)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, proc.communicate()[0].decode()
                time.sleep(0.05)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (tmp_path / "appendonlydir").is_dir()


# ---- init job and entrypoint ---------------------------------------------------------------

FAKE_RANKONE = """#!/bin/sh
echo "$*" >> "$FAKE_CALLS"
[ "$FAKE_FAIL" = 1 ] && exit 0
mkdir -p "$4/backbone" "$4/artifacts"
"""


def run_script(name: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "rankone"
    fake.write_text(FAKE_RANKONE)
    fake.chmod(0o755)
    base = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_CALLS": str(tmp_path / "calls"),
        "FAKE_FAIL": "0",
        "RANKONE_DEMO_DIR": str(tmp_path / "demo"),
    }
    return subprocess.run(
        ["sh", str(DOCKER / name), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_init_builds_the_demo_once(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    first = run_script("init-demo.sh", tmp_path)
    assert first.returncode == 0, first.stderr
    assert calls(tmp_path) == [f"demo --no-serve --cache-dir {demo}"]
    assert (demo / ".complete").exists()
    again = run_script("init-demo.sh", tmp_path)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert len(calls(tmp_path)) == 1


def test_init_does_nothing_when_a_model_is_given(tmp_path: Path) -> None:
    result = run_script("init-demo.sh", tmp_path, RANKONE_MODEL="google/flan-t5-small")
    assert result.returncode == 0
    assert calls(tmp_path) == []


def test_init_fails_and_leaves_no_marker_when_the_demo_is_incomplete(tmp_path: Path) -> None:
    result = run_script("init-demo.sh", tmp_path, FAKE_FAIL="1")
    assert result.returncode == 1
    assert "is missing" in result.stderr
    assert not (tmp_path / "demo" / ".complete").exists()


def test_entrypoint_serves_the_demo_when_no_model_is_given(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    missing = run_script("entrypoint.sh", tmp_path, "env")
    assert missing.returncode == 64
    assert "RANKONE_MODEL is not set" in missing.stderr
    run_script("init-demo.sh", tmp_path)
    result = run_script("entrypoint.sh", tmp_path, "env")
    assert result.returncode == 0, result.stderr
    assert f"RANKONE_MODEL={demo}/backbone" in result.stdout.splitlines()
    assert f"RANKONE_SEED_DIR={demo}/artifacts" in result.stdout.splitlines()


def test_entrypoint_leaves_a_given_model_alone(tmp_path: Path) -> None:
    run_script("init-demo.sh", tmp_path)
    result = run_script("entrypoint.sh", tmp_path, "env", RANKONE_MODEL="/models/t5")
    assert result.returncode == 0
    assert "RANKONE_MODEL=/models/t5" in result.stdout.splitlines()
    assert not any(line.startswith("RANKONE_SEED_DIR=") for line in result.stdout.splitlines())


# ---- Dockerfiles -----------------------------------------------------------------------------


def stages(dockerfile: Path) -> list[str]:
    """The Dockerfile's text split into build stages (each starting at a FROM line)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return re.split(r"^(?=FROM )", text, flags=re.MULTILINE)[1:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_non_root(dockerfile: Path) -> None:
    final = stages(dockerfile)[-1]
    users = re.findall(r"^USER\s+(\S+)", final, flags=re.MULTILINE)
    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_has_no_build_tools(dockerfile: Path) -> None:
    final = stages(dockerfile)[-1]
    for tool in ("gcc", "g++", "build-essential", "python3-dev"):
        assert tool not in final, f"{tool!r} in the final stage of {dockerfile.name}"
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    # The final stage installs prebuilt wheels only (rankone's own, built in the builder, so the
    # dependency layer stays cached while sources change): never resolves dependencies.
    for install in re.findall(r"pip install [^\n]*", final):
        assert install.startswith("pip install --no-deps "), install


def test_service_image_healthcheck_and_command() -> None:
    final = stages(DOCKER / "Dockerfile")[-1]
    assert re.search(r"^HEALTHCHECK .*/healthz", final, flags=re.MULTILINE)
    assert re.search(r"^EXPOSE 8000$", final, flags=re.MULTILINE)
    assert re.search(r"^ENV .*RANKONE_HOST=0\.0\.0\.0 .*RANKONE_PORT=8000 ", final, re.MULTILINE)
    assert 'CMD ["rankone", "serve"]' in final


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_pin_torch_through_constraints(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert "-c constraints.txt torch" in text
    assert "-c constraints.txt -r requirements.txt" in text
    assert re.search(r"^ARG VARIANT=cuda$", text, flags=re.MULTILINE)
    assert "https://download.pytorch.org/whl/cpu" in text
    pins = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", pins, flags=re.MULTILINE)


def test_dockerignore_keeps_the_build_context_small_but_complete() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in (".git", ".venv", ".rankone", "**/__pycache__"):
        assert pattern in ignored
    # The images build the wheel from these: excluding one breaks `pip wheel .`.
    for needed in ("README.md", "pyproject.toml", "constraints.txt", "rankone_cli.py"):
        assert needed not in ignored
        assert f"!{needed}" in ignored or not any(p in {"*", "**"} for p in ignored)
