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


def test_the_ingress_routes_a_task_to_one_replica_and_the_rest_to_any() -> None:
    """ingress-nginx: the generate route hashed on its path (which names the task), every
    other route balanced; both to the server's Service, by its port's name."""
    import re

    ingresses = by_kind("Ingress")
    assert set(ingresses) == {"rankone", "rankone-affinity"}
    service = by_kind("Service")["rankone"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    paths = {}
    for name, ing in ingresses.items():
        assert ing["spec"]["ingressClassName"] == "nginx"
        [rule] = ing["spec"]["rules"]
        [path] = rule["http"]["paths"]
        backend = path["backend"]["service"]
        assert backend["name"] == "rankone" and backend["port"]["name"] in port_names
        paths[name] = path
    notes = ingresses["rankone-affinity"]["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$uri"
    assert notes["nginx.ingress.kubernetes.io/use-regex"] == "true"
    assert "upstream-hash-by" not in str(ingresses["rankone"]["metadata"]["annotations"])
    # the affinity path, as nginx matches it (a regex anchored at the start of the URI)
    pattern = re.compile("^" + paths["rankone-affinity"]["path"])
    assert pattern.match("/v1/tasks/acme.sentiment-2/generate")
    for other in ("/v1/tasks/acme/generatex", "/v1/tasks/a/b/generate", "/v1/tasks/acme",
                  "/v1/chat/completions", "/v1/tasks"):  # fmt: skip
        assert not pattern.match(other), other
    assert paths["rankone"] == {**paths["rankone"], "path": "/", "pathType": "Prefix"}
    # the body limit is at least the server's (fine-tuning files, batch registration)
    body = ingresses["rankone"]["metadata"]["annotations"][
        "nginx.ingress.kubernetes.io/proxy-body-size"
    ]
    assert int(body.removesuffix("m")) * 2**20 >= Settings.model_fields["max_body_bytes"].default
