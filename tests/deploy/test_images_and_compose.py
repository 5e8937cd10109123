"""The compose file validates against the compose specification's schema, and the
Dockerfiles pass structural checks (hadolint is not packaged here): pinned bases, no torch
in the runtime, non-root users, health checks, exec-form entrypoints, pinned installs."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from deploy_manifests import ROOT
from dockerfiles import DEPLOY, DOCKERFILES, build_args, expand, instructions, stages


def compose_schema() -> dict:
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath(
        "compose-spec.json").read_text()
    return json.loads(text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_validates_against_the_compose_spec(compose):
    jsonschema.validate(compose, compose_schema())
    broken = {**compose, "services": {"x": {"image": "a", "restart": "sometimes", "bogus": 1}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, compose_schema())


def test_compose_stack_has_every_component(compose):
    services = compose["services"]
    assert {"kafka", "redis", "worker", "gateway", "producer", "prometheus", "grafana"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert re.match(r"redis:8\.", services["redis"]["image"])
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), name
    worker = services["worker"]
    drain = float(worker["environment"]["EMBEDSTREAM_SHUTDOWN_TIMEOUT_S"])
    assert int(worker["stop_grace_period"].rstrip("s")) > drain
    assert worker["environment"]["EMBEDSTREAM_PROCESSES"] == "1"
    assert worker["deploy"]["replicas"] >= 2
    for name in ("worker", "gateway", "producer"):
        svc = services[name]
        assert svc["read_only"] is True and svc["user"] == "10001:10001", name
        assert svc["cap_drop"] == ["ALL"], name
        assert svc["environment"]["EMBEDSTREAM_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert services["gateway"]["command"][:1] == ["gateway"]
    # Files the stack mounts exist.
    for name in ("prometheus", "grafana", "producer"):
        for volume in services[name].get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume


# Where each third-party image keeps its state, as its image defines it: (the setting that
# moves it, its default). Kafka's default comes from the apache/kafka image's
# configureDefaults (KAFKA_LOG_DIRS=/tmp/kraft-combined-logs), Redis' from the redis image
# (WORKDIR /data, --dir), Prometheus' from prom/prometheus (--storage.tsdb.path, the image's
# CMD gives /prometheus), Grafana's from grafana/grafana (GF_PATHS_DATA=/var/lib/grafana).
STATE_DIRS = {
    "apache/kafka": ("env", "KAFKA_LOG_DIRS", "/tmp/kraft-combined-logs"),
    "redis": ("flag", "--dir", "/data"),
    "prom/prometheus": ("flag", "--storage.tsdb.path", "/prometheus"),
    "grafana/grafana": ("env", "GF_PATHS_DATA", "/var/lib/grafana"),
}


def state_dirs(service: dict) -> list[str]:
    """The directories a third-party service writes its state to, from its own settings."""
    rule = STATE_DIRS.get(service.get("image", "").rsplit(":", 1)[0])
    if rule is None:
        return []
    kind, name, default = rule
    if kind == "env":
        return [d for d in str(service.get("environment", {}).get(name, default)).split(",")]
    command = service.get("command", [])
    for i, arg in enumerate(command):
        if arg == name:
            return [command[i + 1]]
        if arg.startswith(name + "="):
            return [arg.split("=", 1)[1]]
    return [default]


def named_volume_mounts(service: dict, volumes: dict) -> dict[str, bool]:
    """mount path -> writable, for the named volumes (not bind mounts) a service mounts."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        if source in volumes:
            out[target] = "ro" not in mode
    return out


def test_every_stateful_service_writes_into_its_volume(compose):
    volumes = compose["volumes"]
    stateful = {n: s for n, s in compose["services"].items() if state_dirs(s)}
    assert set(stateful) == {"kafka", "redis", "prometheus", "grafana"}
    used = set()
    for name, service in stateful.items():
        mounts = named_volume_mounts(service, volumes)
        for directory in state_dirs(service):
            holder = [m for m in mounts if directory == m or directory.startswith(m.rstrip("/") + "/")]
            assert holder, f"{name} writes {directory}, which no named volume holds: lost on recreate"
            assert all(mounts[m] for m in holder), f"{name}: {directory} is on a read-only mount"
            used.update(s.split(":")[0] for s in service["volumes"] if s.split(":")[1] in holder)
    assert used == set(volumes), "every named volume holds some service's state"
    # Our own services keep nothing: a read-only root and a tmpfs for temporary files.
    for name in ("worker", "gateway", "producer"):
        service = compose["services"][name]
        assert service["read_only"] is True and service["tmpfs"] == ["/tmp"], name
        assert not named_volume_mounts(service, volumes), name


def test_the_state_rules_catch_kafka_writing_to_its_default(compose):
    kafka = {**compose["services"]["kafka"]}
    kafka["environment"] = {k: v for k, v in kafka["environment"].items() if k != "KAFKA_LOG_DIRS"}
    assert state_dirs(kafka) == ["/tmp/kraft-combined-logs"]
    assert not any(d.startswith(m) for d in state_dirs(kafka)
                   for m in named_volume_mounts(kafka, compose["volumes"]))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path: Path):
    ins = instructions(path)
    known = {"ARG", "FROM", "WORKDIR", "COPY", "RUN", "ENV", "USER", "EXPOSE", "HEALTHCHECK",
             "ENTRYPOINT", "CMD", "LABEL"}
    assert {k for k, _ in ins} <= known
    # Base images are pinned to a version tag (ARG defaults), never latest.
    args = dict(re.match(r"(\w+)=(.*)", a).groups() for k, a in ins if k == "ARG" and "=" in a)
    for keyword, value in ins:
        if keyword != "FROM":
            continue
        image = value.split()[0]
        image = args.get(image.strip("${}"), image)
        known_stage = image in stages(path)
        assert known_stage or re.search(r":[\w.-]*\d[\w.-]*$", image), image
        assert not image.endswith(":latest")
    for keyword, value in ins:
        if keyword == "RUN" and "pip install" in value:
            assert "--no-cache-dir" in value
        if keyword == "RUN" and "apt-get install" in value:
            assert "--no-install-recommends" in value and "rm -rf /var/lib/apt/lists" in value
        if keyword == "WORKDIR":
            assert value.startswith("/")
        if keyword == "ADD":
            pytest.fail("use COPY")
        if keyword == "COPY" and "--from" not in value:
            for source in value.split()[:-1]:
                assert (ROOT / source).exists(), source
        if keyword in ("ENTRYPOINT", "CMD"):
            json.loads(value)  # exec form: the process is PID 1 and gets SIGTERM


@pytest.mark.parametrize("path,stage", [(DEPLOY / "Dockerfile", "runtime"),
                                        (DEPLOY / "Dockerfile", "runtime-baked"),
                                        (DEPLOY / "Dockerfile.gpu", "runtime-gpu")])
def test_runtime_images_are_non_root_healthchecked_and_torch_free(path: Path, stage: str):
    all_stages = stages(path)
    chain = [stage]
    if stage == "runtime-baked":
        chain.insert(0, "runtime")
    body = [i for s in chain for i in all_stages[s]]
    users = [v for k, v in body if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(k == "HEALTHCHECK" and "/healthz" in v for k, v in body)
    runs = " ".join(v for k, v in body if k == "RUN")
    assert "[export]" not in runs and "torch" not in runs
    assert "-c /tmp/constraints.txt" in runs  # every Python package pinned
    extras = set(re.search(r"\$\{wheel\}\[([\w,]+)\]", runs).group(1).split(","))
    assert "confluent" in extras  # both Kafka clients (EMBEDSTREAM_KAFKA_CLIENT) work
    # The CPU image also runs the gateway (compose and the chart start it from this image).
    assert ("gateway" in extras) == (stage != "runtime-gpu")
    env = " ".join(v for k, v in body if k == "ENV")
    assert "EMBEDSTREAM_PROCESSES=1" in env and "EMBEDSTREAM_MODEL_DIR=/models" in env
    if stage == "runtime-gpu":
        assert "pip uninstall -y onnxruntime" in runs and "onnxruntime-gpu==" in runs


def test_exporter_and_models_stages_produce_model_directories():
    all_stages = stages(DEPLOY / "Dockerfile")
    exporter = " ".join(v for k, v in all_stages["exporter"] if k == "RUN")
    assert "[export]" in exporter and "embedstream export" in exporter
    assert ("COPY", "--from=exporter --chown=10001:10001 /models /models") in all_stages["models"]
    assert ("COPY", "--from=exporter --chown=10001:10001 /models /models") in all_stages[
        "runtime-baked"]


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "models"} <= set(ignored)
    assert not {"services", "pyproject.toml", "constraints.txt", "README.md"} & set(ignored)


def test_gpu_image_extends_the_library_path_it_inherits():
    """The CUDA base sets LD_LIBRARY_PATH to /usr/local/nvidia/lib:/usr/local/nvidia/lib64,
    where some clusters mount the driver: the image adds TensorRT's folder in front."""
    path = DEPLOY / "Dockerfile.gpu"
    (value,) = [a.split("=", 1)[1] for k, a in stages(path)["runtime-gpu"]
                if k == "ENV" and a.startswith("LD_LIBRARY_PATH=")]
    inherited = "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"
    assert expand(value, {"LD_LIBRARY_PATH": inherited}) == f"/opt/tensorrt_libs:{inherited}"
    assert expand(value, {}) == "/opt/tensorrt_libs"
    runs = " ".join(a for k, a in stages(path)["runtime-gpu"] if k == "RUN")
    # The link to the pip TensorRT libraries names no Python version (the base decides it).
    assert "ln -s" in runs and "/opt/tensorrt_libs" in runs
    assert not re.search(r"python3\.\d+/site-packages", value + runs)
    assert build_args(path)["TENSORRT"] == "false"  # TensorRT is opt-in (its own tag)
