"""The Kubernetes manifests (deploy/k8s/): valid against the Kubernetes API schemas, offline
(kubernetes-validate carries them), and wired the way the server expects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.settings import Settings
from service.store.redis_connect import parse_sentinel_url

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.37.0"


def resources() -> list[dict[str, Any]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources() if r["kind"] == kind}


@pytest.mark.parametrize(
    "resource", resources(), ids=lambda r: f"{r['kind']}/{r['metadata']['name']}"
)
def test_manifests_are_valid_kubernetes(resource: dict[str, Any]) -> None:
    kubernetes_validate.validate(resource, VERSION, strict=True)


def test_the_validator_refuses_a_wrong_manifest() -> None:
    bad = by_kind("Deployment")["rankone"]
    bad = {**bad, "spec": {**bad["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def test_the_server_deployment_probes_scales_and_reaches_the_sentinels() -> None:
    [container] = by_kind("Deployment")["rankone"]["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    settings = {k.removeprefix("RANKONE_").lower() for k in env}
    assert settings <= set(Settings.model_fields), settings - set(Settings.model_fields)
    url = parse_sentinel_url(env["RANKONE_REDIS_URL"])
    sentinels = by_kind("StatefulSet")["rankone-sentinel"]
    assert len(url.sentinels) == sentinels["spec"]["replicas"] == 3
    assert all(h.endswith(".rankone-sentinel") and p == 26379 for h, p in url.sentinels)
    assert url.service in by_kind("ConfigMap")["rankone-redis"]["data"]["sentinel.conf"]
    [metric] = by_kind("HorizontalPodAutoscaler")["rankone"]["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "rankone_queue_depth"  # a gauge of /metrics
    from service.metrics import Metrics

    assert b"rankone_queue_depth " in Metrics().render()[0]
    assert set(by_kind("PodDisruptionBudget")) == {"rankone", "rankone-redis", "rankone-sentinel"}
    assert by_kind("StatefulSet")["rankone-redis"]["spec"]["replicas"] == 3
