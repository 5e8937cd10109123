"""The Helm chart lints and renders with real Helm, offline, under every ci/ values file;
every rendered object validates against the Kubernetes schemas; and what matters holds:
GPU pools get GPUs, every pod runs non-root on a read-only root with probes, KEDA scales
the right consumer group, secrets are only referenced."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from deploy_manifests import (
    CHART,
    CI_VALUES,
    CRD_KINDS,
    KUBE_VERSION,
    ROOT,
    env_of,
    load_values,
    of_kind,
    render,
)

# What each values file renders (kind -> count): changes here are deliberate.
EXPECTED_KINDS = {
    "cpu-values.yaml": {"ServiceAccount": 1, "Deployment": 2, "PodDisruptionBudget": 2,
                        "HorizontalPodAutoscaler": 1, "PodMonitor": 1, "PrometheusRule": 1,
                        "ConfigMap": 1, "NetworkPolicy": 1},
    "gpu-values.yaml": {"ServiceAccount": 1, "Deployment": 3, "PodDisruptionBudget": 3,
                        "Service": 3, "ServiceMonitor": 1, "NetworkPolicy": 1},
    "keda-values.yaml": {"ServiceAccount": 1, "Deployment": 3, "PodDisruptionBudget": 3,
                         "ScaledObject": 2, "PodMonitor": 2, "Service": 1, "NetworkPolicy": 2},
    "secrets-values.yaml": {"ServiceAccount": 1, "Deployment": 2, "PodDisruptionBudget": 2,
                            "ScaledObject": 1, "TriggerAuthentication": 1, "Service": 1,
                            "NetworkPolicy": 2},
    "strimzi-values.yaml": {"ServiceAccount": 1, "Deployment": 3, "PodDisruptionBudget": 3,
                            "ScaledObject": 2, "TriggerAuthentication": 2, "Service": 1,
                            "KafkaTopic": 3, "NetworkPolicy": 2, "Ingress": 1},
}

ids = [p.name for p in CI_VALUES]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    out = {p.name: render(load_values(p)) for p in CI_VALUES}
    out["defaults"] = render(None)
    return out


def test_every_ci_values_file_is_covered():
    assert {p.name for p in CI_VALUES} == set(EXPECTED_KINDS)


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=["defaults", *ids])
def test_chart_lints_clean_in_strict_mode(values_file: Path | None):
    report = helm.lint(CHART, load_values(values_file), strict=True,
                       kube_version=f"v{KUBE_VERSION}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == [] and report["messages"] == [], report


@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_rendered_objects_match_expected_kinds(rendered, values_file: Path):
    docs = rendered[values_file.name]
    counts: dict[str, int] = {}
    for doc in docs:
        counts[doc["kind"]] = counts.get(doc["kind"], 0) + 1
    print(f"{values_file.name}: {len(docs)} objects {dict(sorted(counts.items()))}")
    assert counts == EXPECTED_KINDS[values_file.name]


@pytest.mark.parametrize("values_file", CI_VALUES, ids=ids)
def test_every_object_validates_against_the_kubernetes_schemas(rendered, values_file: Path):
    for doc in rendered[values_file.name]:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == CRD_KINDS[doc["kind"]]
            assert doc["metadata"]["name"] and isinstance(doc["spec"], dict)
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_schema_rejects_bad_values():
    bad = {"workerPools": [{"name": "x", "modality": "video", "models": ["m"]}]}
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError, match="modality"):
            chart.validate_schema(bad)
        with pytest.raises(helm.HelmValuesError, match="typo"):
            chart.validate_schema({"workerPools": [{"name": "x", "modality": "text",
                                                    "models": ["m"], "typo": 1}]})
        with pytest.raises(helm.HelmValuesError, match="kafkaClient"):
            chart.validate_schema({"worker": {"kafkaClient": "librdkafka"}})
        # Images may be pinned by digest, and only by a well-formed one.
        digest = "sha256:" + "ab" * 32
        chart.validate_schema({"image": {"repository": "r/e", "digest": digest},
                               "gateway": {"image": {"digest": digest}},
                               "modelDelivery": {"init": {"image": {"repository": "r/m",
                                                                    "digest": digest}}},
                               "workerPools": [{"name": "x", "modality": "text", "models": ["m"],
                                                "image": {"digest": digest}}]})
        with pytest.raises(helm.HelmValuesError, match="digest"):
            chart.validate_schema({"image": {"repository": "r/e", "digest": "latest"}})
    report = helm.lint(CHART, bad)
    assert report["messages"], "lint must report a schema violation"


def test_template_guards_fail_with_a_clear_message():
    pool = {"name": "p", "modality": "text", "models": ["m"],
            "autoscaling": {"keda": {"enabled": True}, "hpa": {"enabled": True}}}
    with pytest.raises(helm.HelmError, match="not both"):
        render({"workerPools": [pool]})
    with pytest.raises(helm.HelmError, match="existingSecret is required"):
        render({"kafka": {"bootstrap": "k:9092", "securityProtocol": "SASL_SSL"}})
    with pytest.raises(helm.HelmError, match="claimName is required"):
        render({"modelDelivery": {"mode": "pvc"}})
    # The init container's volume over the image's own models would hide them.
    with pytest.raises(helm.HelmError, match="must not be, hold or sit inside sourcePath"):
        render({"modelDelivery": {"init": {"targetPath": "/models"}}})
    with pytest.raises(helm.HelmError, match="must not be, hold or sit inside sourcePath"):
        render({"modelDelivery": {"init": {"targetPath": "/"}}})
    # Mode image with the default tag: the runtime image, which has no models.
    with pytest.raises(helm.HelmError, match="needs an image with the models baked in"):
        render({"modelDelivery": {"mode": "image"}})
    render({"modelDelivery": {"mode": "image"}, "image": {"repository": "r/e", "tag": "0.1.0-models"}})
    with pytest.raises(helm.HelmError, match="strimziCluster is required"):
        render({"kafka": {"bootstrap": "k:9092", "topics": {"create": True}}})
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render({"gateway": {"enabled": True, "preStopDelaySeconds": 25}})


def _workers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["labels"]["embedstream.io/pool"]: d for d in of_kind(docs, "Deployment")
            if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"}


def test_gpu_pools_get_gpus_and_cpu_pools_do_not(rendered):
    workers = _workers(rendered["gpu-values.yaml"])
    assert set(workers) == {"text-cpu", "text-gpu", "text-trt"}
    for name, dep in workers.items():
        pod = dep["spec"]["template"]["spec"]
        (worker,) = pod["containers"]
        env = env_of(worker)
        limits = worker["resources"]["limits"]
        if name == "text-cpu":
            assert "nvidia.com/gpu" not in limits and "EMBEDSTREAM_PROVIDERS" not in env
            assert "EMBEDSTREAM_INFERENCE_INSTANCES" not in env  # auto
            assert "runtimeClassName" not in pod
            continue
        assert limits["nvidia.com/gpu"] == 1
        assert pod["runtimeClassName"] == "nvidia"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"]
        assert pod["nodeSelector"]
        assert "CUDAExecutionProvider" in json.loads(env["EMBEDSTREAM_PROVIDERS"])
        assert "embedstream-gpu" in worker["image"]
        assert env["EMBEDSTREAM_INTRA_OP_THREADS"] == "4"  # the CPU limit
    gpu_env = env_of(workers["text-gpu"]["spec"]["template"]["spec"]["containers"][0])
    assert gpu_env["EMBEDSTREAM_INFERENCE_INSTANCES"] == "2"
    trt = workers["text-trt"]["spec"]["template"]["spec"]
    assert json.loads(env_of(trt["containers"][0])["EMBEDSTREAM_PROVIDERS"])[0] == (
        "TensorrtExecutionProvider")


def test_model_delivery_modes(rendered):
    workers = _workers(rendered["gpu-values.yaml"])
    volumes = {n: {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
               for n, d in workers.items()}
    assert "models" not in volumes["text-cpu"]  # baked into the image
    assert workers["text-cpu"]["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        ":0.1.0-models")
    assert volumes["text-gpu"]["models"]["emptyDir"]["sizeLimit"] == "4Gi"
    init = workers["text-gpu"]["spec"]["template"]["spec"]["initContainers"][0]
    # The emptyDir goes beside the image's /models, not over it (which would hide them).
    assert init["volumeMounts"] == [{"name": "models", "mountPath": "/mnt/models"}]
    assert env_of(init)["MODEL_TARGET"] == "/mnt/models"
    assert env_of(init)["MODEL_SOURCE"] == "/models"
    assert env_of(init)["MODELS"] == "all-minilm-l6-v2"
    worker_mount = next(m for m in workers["text-gpu"]["spec"]["template"]["spec"]["containers"][0][
        "volumeMounts"] if m["name"] == "models")
    assert worker_mount == {"name": "models", "mountPath": "/models", "readOnly": True}
    assert volumes["text-trt"]["models"]["persistentVolumeClaim"] == {
        "claimName": "embedstream-models", "readOnly": True}
    mount = next(m for m in workers["text-trt"]["spec"]["template"]["spec"]["containers"][0][
        "volumeMounts"] if m["name"] == "models")
    assert mount == {"name": "models", "mountPath": "/models", "readOnly": True, "subPath": "v1"}


def test_default_install_delivers_models_to_the_plain_runtime_image(rendered):
    """The default image tag is the runtime without models: the default delivery copies
    them from the models image of the same version."""
    (dep,) = of_kind(rendered["defaults"], "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "ghcr.io/embedstream/embedstream:0.1.0"
    (init,) = pod["initContainers"]
    assert init["image"] == "ghcr.io/embedstream/embedstream-models:0.1.0"


def test_image_digests_replace_tags(rendered):
    for dep in of_kind(rendered["strimzi-values.yaml"], "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            assert re.fullmatch(r"[\w./-]+@sha256:[0-9a-f]{64}", container["image"]), container["image"]


def _pod_of(docs: list[dict[str, Any]], pool: str) -> dict[str, Any]:
    return _workers(docs)[pool]["spec"]["template"]["spec"]


def test_threads_follow_the_cpu_limit_else_the_request(rendered):
    docs = rendered["strimzi-values.yaml"]
    threads = {p: env_of(_pod_of(docs, p)["containers"][0])["EMBEDSTREAM_INTRA_OP_THREADS"]
               for p in ("text", "image")}
    assert threads == {"text": "1", "image": "2"}  # requests 1500m and 2, no CPU limits
    bulk = env_of(_pod_of(rendered["cpu-values.yaml"], "text-bulk")["containers"][0])
    assert bulk["EMBEDSTREAM_INTRA_OP_THREADS"] == "4"  # the 4000m limit wins over the request


def test_probes_and_rollouts_are_per_pool(rendered):
    cpu = rendered["cpu-values.yaml"]
    bulk, plain = _workers(cpu)["text-bulk"], _workers(cpu)["text-cpu"]
    assert bulk["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 2, "maxUnavailable": 0}
    assert plain["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    startup = bulk["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert startup["failureThreshold"] == 120 and startup["periodSeconds"] == 5  # merged
    gpu = _workers(rendered["gpu-values.yaml"])
    for name in ("text-gpu", "text-trt"):
        # A surge pod would wait for a GPU that the old pod holds: replace in place.
        assert gpu[name]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    trt = gpu["text-trt"]["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    cuda = gpu["text-gpu"]["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert trt["periodSeconds"] * trt["failureThreshold"] > cuda["periodSeconds"] * cuda["failureThreshold"]


def test_pods_spread_over_nodes_and_zones(rendered):
    for docs in rendered.values():
        for dep in of_kind(docs, "Deployment"):
            pod = dep["spec"]["template"]["spec"]
            spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
            assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
            for constraint in spread.values():
                assert constraint["labelSelector"]["matchLabels"] == dep["spec"]["selector"][
                    "matchLabels"]
                assert constraint["matchLabelKeys"] == ["pod-template-hash"]


def test_gateway_starts_drains_and_searches(rendered):
    docs = rendered["keda-values.yaml"]
    gateway = next(d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-gateway"))
    pod = gateway["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    delay = int(main["lifecycle"]["preStop"]["exec"]["command"][1])
    assert main["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep" and delay > 0
    assert pod["terminationGracePeriodSeconds"] > delay + 10  # + uvicorn's drain
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    env = env_of(main)
    assert "--no-search" not in main["args"]
    assert json.loads(env["EMBEDSTREAM_MODELS"]) == ["all-minilm-l6-v2"]  # the pools' models
    assert pod["initContainers"][0]["name"] == "fetch-models"


def test_pdbs_let_unhealthy_pods_be_evicted(rendered):
    pdbs = [p for docs in rendered.values() for p in of_kind(docs, "PodDisruptionBudget")]
    assert pdbs
    for pdb in pdbs:
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


@pytest.mark.parametrize("values_file", [*CI_VALUES], ids=ids)
def test_pods_are_hardened_probed_and_drain_before_sigkill(rendered, values_file: Path):
    values = load_values(values_file) or {}
    for dep in of_kind(rendered[values_file.name], "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
        main = pod["containers"][0]
        assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert any(m["mountPath"] == "/tmp" for m in main["volumeMounts"])
        if main["name"] != "worker":
            continue
        env = env_of(main)
        assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert main["readinessProbe"]["httpGet"]["port"] == "metrics"
        assert env["EMBEDSTREAM_PROCESSES"] == "1"
        drain = float(env["EMBEDSTREAM_SHUTDOWN_TIMEOUT_S"])
        assert pod["terminationGracePeriodSeconds"] >= drain + 10
        pool = next(p for p in values["workerPools"]
                    if p["name"] == dep["metadata"]["labels"]["embedstream.io/pool"])
        assert json.loads(env["EMBEDSTREAM_MODELS"]) == pool["models"]
        default_client = values.get("worker", {}).get("kafkaClient", "kafka-python")
        assert env["EMBEDSTREAM_KAFKA_CLIENT"] == pool.get("kafkaClient", default_client)


def test_keda_scales_each_pool_on_its_own_group_and_topic(rendered):
    docs = rendered["keda-values.yaml"]
    workers = _workers(docs)
    scaled = {s["metadata"]["labels"]["embedstream.io/pool"]: s for s in of_kind(docs, "ScaledObject")}
    assert set(scaled) == {"text-cpu", "text-gpu"}
    for name, obj in scaled.items():
        dep = workers[name]
        assert "replicas" not in dep["spec"], "KEDA owns the replica count"
        assert obj["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        (trigger,) = obj["spec"]["triggers"]
        env = env_of(dep["spec"]["template"]["spec"]["containers"][0])
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == env["EMBEDSTREAM_GROUP_ID"]
        assert trigger["metadata"]["topic"] == env["EMBEDSTREAM_TOPIC_TEXT"]
        assert trigger["metadata"]["bootstrapServers"] == env["EMBEDSTREAM_KAFKA_BOOTSTRAP"]
        assert "authenticationRef" not in trigger
    assert scaled["text-gpu"]["spec"]["minReplicaCount"] == 0
    assert scaled["text-cpu"]["spec"]["triggers"][0]["metadata"]["lagThreshold"] == "2000"
    for obj in scaled.values():
        spec = obj["spec"]
        assert spec["fallback"]["failureThreshold"] >= 1 and spec["fallback"]["replicas"] >= 1
        (up,) = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"]["policies"]
        assert up["type"] == "Pods" and up["value"] >= 1


def test_consumer_groups_include_the_release(rendered):
    groups = {}
    for release in ("blue", "green"):
        for dep in _workers(render(load_values(CHART / "ci" / "keda-values.yaml"), name=release)).values():
            groups.setdefault(release, set()).add(
                env_of(dep["spec"]["template"]["spec"]["containers"][0])["EMBEDSTREAM_GROUP_ID"])
    assert groups["blue"] and not groups["blue"] & groups["green"]
    assert all(g.startswith("blue-") for g in groups["blue"])


def test_keda_lag_threshold_follows_the_modality(rendered):
    scaled = {s["metadata"]["labels"]["embedstream.io/pool"]: s
              for s in of_kind(rendered["strimzi-values.yaml"], "ScaledObject")}
    text = int(scaled["text"]["spec"]["triggers"][0]["metadata"]["lagThreshold"])
    image = int(scaled["image"]["spec"]["triggers"][0]["metadata"]["lagThreshold"])
    assert text >= 50 * image  # media events are ~100x a text's bytes and time
    assert scaled["image"]["spec"]["fallback"]["replicas"] == 2  # the pool's own


def _projected(pod: dict[str, Any], volume: str) -> dict[str, tuple[str, str]]:
    """path in the volume -> (Secret, key), for a projected or secret volume."""
    vol = next(v for v in pod["volumes"] if v["name"] == volume)
    sources = ([s["secret"] for s in vol["projected"]["sources"]] if "projected" in vol
               else [{**vol["secret"], "name": vol["secret"]["secretName"]}])
    return {i["path"]: (s["name"], i["key"]) for s in sources for i in s["items"]}


def test_secrets_are_referenced_never_inlined(rendered):
    docs = rendered["secrets-values.yaml"]
    assert not of_kind(docs, "Secret")
    for dep in of_kind(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        env = env_of(pod["containers"][0])
        assert env["EMBEDSTREAM_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert env["EMBEDSTREAM_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        for var, secret in [("EMBEDSTREAM_KAFKA_SASL_USERNAME", "embedstream-kafka-sasl"),
                            ("EMBEDSTREAM_KAFKA_SASL_PASSWORD", "embedstream-kafka-sasl"),
                            ("EMBEDSTREAM_REDIS_USERNAME", "embedstream-redis"),
                            ("EMBEDSTREAM_REDIS_PASSWORD", "embedstream-redis")]:
            assert env[var]["secretKeyRef"]["name"] == secret, var
        assert env["EMBEDSTREAM_KAFKA_SSL_CAFILE"] == "/etc/embedstream/kafka-tls/ca.crt"
        assert env["EMBEDSTREAM_KAFKA_SSL_CERTFILE"] == "/etc/embedstream/kafka-tls/client.crt"
        assert env["EMBEDSTREAM_KAFKA_SSL_KEYFILE"] == "/etc/embedstream/kafka-tls/client.key"
        assert env["EMBEDSTREAM_REDIS_URL"].startswith("rediss://")
        assert env["EMBEDSTREAM_REDIS_SSL_CA_FILE"] == "/etc/embedstream/redis-tls/ca.crt"
        # The CA and the client certificate come from separate Secrets into one folder.
        assert _projected(pod, "kafka-tls") == {
            "ca.crt": ("kafka-cluster-ca-cert", "ca.crt"),
            "client.crt": ("embedstream-kafka-tls", "tls.crt"),
            "client.key": ("embedstream-kafka-tls", "tls.key")}
        assert _projected(pod, "redis-tls") == {"ca.crt": ("redis-ca", "ca.crt")}
    (auth,) = of_kind(docs, "TriggerAuthentication")
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {"username": ("embedstream-kafka-sasl", "username"),
                    "password": ("embedstream-kafka-sasl", "password"),
                    "ca": ("kafka-cluster-ca-cert", "ca.crt"),
                    "cert": ("embedstream-kafka-tls", "tls.crt"),
                    "key": ("embedstream-kafka-tls", "tls.key")}
    (scaled,) = of_kind(docs, "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["metadata"]["sasl"] == "scram_sha512" and trigger["metadata"]["tls"] == "enable"
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]


def test_strimzi_shapes(rendered):
    """A KafkaUser's Secret holds only `password` (the user name is the KafkaUser's name) and
    the cluster CA sits in `<cluster>-cluster-ca-cert`; KEDA reads the plain user name from
    the worker's environment; topics are KafkaTopics of the named cluster."""
    docs = rendered["strimzi-values.yaml"]
    for dep in of_kind(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        env = env_of(pod["containers"][0])
        assert env["EMBEDSTREAM_KAFKA_SASL_USERNAME"] == "embedstream"
        assert env["EMBEDSTREAM_KAFKA_SASL_PASSWORD"]["secretKeyRef"] == {
            "name": "embedstream", "key": "password"}
        assert _projected(pod, "kafka-tls") == {"ca.crt": ("my-cluster-cluster-ca-cert", "ca.crt")}
        assert "EMBEDSTREAM_KAFKA_SSL_CERTFILE" not in env
        for container in pod["containers"] + pod.get("initContainers", []):
            assert "@sha256:" in container["image"], container["name"]
    auths = of_kind(docs, "TriggerAuthentication")
    assert len(auths) == 2
    for auth in auths:
        assert auth["spec"]["env"] == [{"parameter": "username", "containerName": "worker",
                                        "name": "EMBEDSTREAM_KAFKA_SASL_USERNAME"}]
        refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
        assert refs == {"password": ("embedstream", "password"),
                        "ca": ("my-cluster-cluster-ca-cert", "ca.crt")}
    topics = of_kind(docs, "KafkaTopic")
    assert {t["spec"]["topicName"] for t in topics} == {
        "embedstream.text", "embedstream.image", "embedstream.dlq"}
    for topic in topics:
        assert topic["apiVersion"] == "kafka.strimzi.io/v1beta2"
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "my-cluster"
        assert topic["metadata"]["namespace"] == "kafka"
        assert topic["spec"]["partitions"] == 12 and topic["spec"]["replicas"] == 3
    dlq = {env_of(d["spec"]["template"]["spec"]["containers"][0]).get("EMBEDSTREAM_TOPIC_DLQ")
           for d in _workers(docs).values()}
    assert dlq == {"embedstream.dlq"}


def test_monitors_name_the_job_like_the_alerts_expect(rendered):
    for docs in rendered.values():
        for mon in of_kind(docs, "PodMonitor") + of_kind(docs, "ServiceMonitor"):
            endpoints = mon["spec"].get("podMetricsEndpoints") or mon["spec"]["endpoints"]
            jobs = {r["replacement"] for e in endpoints for r in e["relabelings"]
                    if r["targetLabel"] == "job"}
            assert jobs <= {"embedstream-worker", "embedstream-gateway"} and jobs
    (rule,) = of_kind(rendered["cpu-values.yaml"], "PrometheusRule")
    deploy_rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    assert rule["spec"] == deploy_rules
    (dash,) = of_kind(rendered["cpu-values.yaml"], "ConfigMap")
    assert json.loads(dash["data"]["embedstream.json"])["uid"] == "embedstream-overview"


def test_chart_copies_of_alerts_and_dashboard_are_identical():
    assert (CHART / "files/alerts.yml").read_text() == (
        ROOT / "deploy/prometheus/alerts.yml").read_text()
    assert (CHART / "files/dashboard.json").read_text() == (
        ROOT / "deploy/grafana/dashboards/embedstream.json").read_text()


def _leaf_paths(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict) and tree:
        return [p for k, v in tree.items() for p in _leaf_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")]


def test_chart_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()
    table = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pools = values.pop("workerPools")
    for path in _leaf_paths(values):
        parent = path
        while parent and parent not in table:
            parent = parent.rpartition(".")[0]
        assert parent, f"values key {path} is missing from the chart README's table"
    schema = json.loads((CHART / "values.schema.json").read_text())
    for key in schema["properties"]["workerPools"]["items"]["properties"]:
        assert f"workerPools[].{key}" in table, key
    assert pools
