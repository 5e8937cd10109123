"""The chart keeps the gateway closed unless opened: keys from an existing Secret (mounted
so updates reach the pod), a NetworkPolicy per component, an Ingress only with keys and
TLS; the schema and the templates refuse to expose a gateway without auth."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
from deploy_manifests import CHART, env_of, of_kind, render

KEYS = {"existingSecret": "gw-keys", "secretKey": "keys.txt"}


def named(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    return next(d for d in of_kind(docs, kind) if d["metadata"]["name"].endswith(suffix))


def gateway_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return named(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]


def test_keys_come_from_the_secret_as_a_file_that_updates():
    docs = render({"gateway": {"enabled": True, "auth": {**KEYS, "rateLimit": 20}},
                   "worker": {"tenantFrom": "header"}})
    pod = gateway_pod(docs)
    (main,) = pod["containers"]
    env = env_of(main)
    mount = next(m for m in main["volumeMounts"] if m["name"] == "gateway-keys")
    assert "subPath" not in mount and mount["readOnly"]  # a subPath mount never updates
    assert env["EMBEDSTREAM_GATEWAY_API_KEYS_FILE"] == mount["mountPath"] + "/keys"
    volume = next(v for v in pod["volumes"] if v["name"] == "gateway-keys")
    assert volume["secret"]["secretName"] == "gw-keys"
    assert volume["secret"]["items"] == [{"key": "keys.txt", "path": "keys"}]
    assert "EMBEDSTREAM_GATEWAY_ALLOW_ANONYMOUS" not in env
    assert env["EMBEDSTREAM_GATEWAY_RATE_LIMIT"] == "20"
    assert main["args"][:3] == ["gateway", "--host", "0.0.0.0"]
    workers = [d for d in of_kind(docs, "Deployment") if not d["metadata"]["name"].endswith("-gateway")]
    for dep in [named(docs, "Deployment", "-gateway"), *workers]:
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert env_of(container)["EMBEDSTREAM_TENANT_FROM"] == "header"


def test_every_component_has_a_network_policy_admitting_only_its_port():
    docs = render({"gateway": {"enabled": True, "auth": KEYS}})
    worker, gateway = named(docs, "NetworkPolicy", "-worker"), named(docs, "NetworkPolicy", "-gateway")
    for policy, component, port in ((worker, "worker", "metrics"), (gateway, "gateway", "http")):
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        assert spec["policyTypes"] == ["Ingress"]
        (rule,) = spec["ingress"]
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
        assert rule["from"] == [{"namespaceSelector": {}}]  # in-cluster only by default
    selected = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
                for d in of_kind(docs, "Deployment")}
    for name, labels in selected.items():  # each pod is selected by its own policy
        policy = gateway if name.endswith("-gateway") else worker
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items(), name
    exposed = render({"gateway": {"enabled": True, "auth": KEYS,
                                  "service": {"type": "LoadBalancer"}}})
    assert {"ipBlock": {"cidr": "0.0.0.0/0"}} in \
        named(exposed, "NetworkPolicy", "-gateway")["spec"]["ingress"][0]["from"]
    assert of_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == []


def test_an_ingress_serves_the_gateway_over_tls():
    docs = render({"gateway": {"enabled": True, "auth": KEYS, "ingress": {
        "enabled": True, "host": "s.example.com", "className": "nginx",
        "tls": {"secretName": "s-tls"}}}})
    (ingress,) = of_kind(docs, "Ingress")
    assert ingress["spec"]["tls"] == [{"secretName": "s-tls", "hosts": ["s.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == named(docs, "Service", "-gateway")["metadata"]["name"]
    assert backend["port"] == {"name": "http"}


@pytest.mark.parametrize("gateway", [
    {"ingress": {"enabled": True, "tls": {"secretName": "t"}}},
    {"ingress": {"enabled": True, "tls": {"secretName": "t"}}, "auth": {"allowAnonymous": True}},
    {"service": {"type": "LoadBalancer"}, "auth": {"allowAnonymous": True}},
    {"service": {"type": "NodePort"}},
    {"ingress": {"enabled": True}, "auth": KEYS},  # keys but no TLS
], ids=["ingress", "ingress-anonymous", "loadbalancer-anonymous", "nodeport", "ingress-no-tls"])
def test_the_schema_refuses_an_open_or_plaintext_exposure(gateway):
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"gateway": {"enabled": True, **gateway}})


def test_the_templates_refuse_a_gateway_without_keys_or_explicit_anonymous():
    with pytest.raises(helm.HelmError, match=r"gateway\.auth\.existingSecret"):
        render({"gateway": {"enabled": True}})
    docs = render({"gateway": {"enabled": True, "auth": {"allowAnonymous": True}}})
    env = env_of(gateway_pod(docs)["containers"][0])
    assert env["EMBEDSTREAM_GATEWAY_ALLOW_ANONYMOUS"] == "true"
    assert "EMBEDSTREAM_GATEWAY_API_KEYS_FILE" not in env
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({"gateway": {"enabled": True, "auth": KEYS, "ingress": {
            "enabled": True, "tls": {"secretName": "t"}}, "service": {"type": "LoadBalancer"}}})
