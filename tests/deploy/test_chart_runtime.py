"""What the chart's pods execute, checked against the volumes they mount.

There is no cluster here, so each pod is rebuilt as a directory tree: the image's own files
(the models image holds the exported models at its source path), then every volume mount
laid over it, hiding what the image had there, as a container runtime does. The init
container's real command then runs in that tree (absolute paths rewritten under it), and
the worker's model directory must hold every model it serves, complete (the worker's own
manifest check). Beside that, for every values file: no mount hides a path a command
reads, every path a process writes (model copies, TensorRT engines, temporary files; the
root filesystem is read-only) is on a writable volume, and every file named in the
environment (certificates) is one its volume provides.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from deploy_manifests import CI_VALUES, ROOT, env_of, load_values, of_kind, render

from embedstream.models.manifest import Manifest, file_sha256, find_models, load_manifest
from embedstream.runtime import onnx as ort_backend

# Every ci/ values file, the defaults, and the delivery modes the ci/ files leave out.
VALUES: dict[str, dict[str, Any] | None] = {
    "defaults": None,
    **{p.name: load_values(p) for p in CI_VALUES},
    "gateway-search": {"gateway": {"enabled": True, "auth": {"allowAnonymous": True}}},
    "gateway-ingest-only": {"gateway": {"enabled": True, "search": False,
                                        "auth": {"existingSecret": "keys"}}},
    "image-mode": {"modelDelivery": {"mode": "image"}, "image": {"tag": "0.1.0-models"},
                   "gateway": {"enabled": True, "auth": {"allowAnonymous": True}}},
    "pvc-mode": {"modelDelivery": {"mode": "pvc", "pvc": {"claimName": "models", "subPath": "v2"}},
                 "gateway": {"enabled": True, "auth": {"allowAnonymous": True}}},
    "custom-paths": {"modelDelivery": {"path": "/srv/models", "init": {
        "sourcePath": "/opt/models", "targetPath": "/work/out"}}},
}
SECRET_FILE_VARS = ("EMBEDSTREAM_KAFKA_SSL_CAFILE", "EMBEDSTREAM_KAFKA_SSL_CERTFILE",
                    "EMBEDSTREAM_KAFKA_SSL_KEYFILE", "EMBEDSTREAM_REDIS_SSL_CA_FILE",
                    "EMBEDSTREAM_GATEWAY_API_KEYS_FILE")


def pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in of_kind(docs, "Deployment")}


@functools.cache
def render_all() -> dict[str, dict[str, dict[str, Any]]]:
    return {name: pods(render(values)) for name, values in VALUES.items()}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict[str, Any]]]:
    return render_all()


def _under(path: str, mount: str) -> bool:
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def holder(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The mount a path lies on (the deepest), or None: the image's own filesystem."""
    found = [m for m in container.get("volumeMounts", []) if _under(path, m["mountPath"])]
    return max(found, key=lambda m: len(m["mountPath"])) if found else None


def volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(v for v in pod["volumes"] if v["name"] == name)


def provided_files(vol: dict[str, Any]) -> set[str] | None:
    """Paths a secret or projected volume provides (None: any, e.g. a whole Secret)."""
    if "secret" in vol:
        sources = [vol["secret"]]
    elif "projected" in vol:
        sources = [s["secret"] for s in vol["projected"]["sources"]]
    else:
        return set()
    if any("items" not in s for s in sources):
        return None
    return {i["path"] for s in sources for i in s["items"]}


def writable(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    mount = holder(container, path)
    assert mount is not None, f"{container['name']} writes {path} on its read-only root filesystem"
    assert not mount.get("readOnly"), f"{container['name']} writes {path} on a read-only mount"
    vol = volume(pod, mount["name"])
    assert "emptyDir" in vol or "persistentVolumeClaim" in vol, (container["name"], path, vol)
    return mount


def engine_cache(env: dict[str, Any], model: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Where the runtime puts a model's TensorRT engines, in this container's environment."""
    monkeypatch.setattr(ort_backend.tempfile, "gettempdir", lambda: env.get("TMPDIR", "/tmp"))
    return str(ort_backend.engine_cache_dir(f"{env['EMBEDSTREAM_MODEL_DIR']}/{model}/model.onnx"))


@pytest.mark.parametrize("values", VALUES, ids=list(VALUES))
def test_mounts_hide_nothing_read_and_hold_everything_written(
        rendered, values: str, monkeypatch: pytest.MonkeyPatch):
    checked = 0
    for name, pod in rendered[values].items():
        main = pod["containers"][0]
        env = env_of(main)
        assert main["securityContext"]["readOnlyRootFilesystem"] is True
        writable(pod, main, "/tmp")  # Python's and the runtime's temporary files
        for init in pod.get("initContainers", []):
            ienv = env_of(init)
            # The command reads MODEL_SOURCE (the image's own models): no mount may hide it.
            assert "$MODEL_SOURCE" in " ".join(init["command"])
            hidden = holder(init, ienv["MODEL_SOURCE"])
            assert hidden is None, f"{name}: {hidden} hides {ienv['MODEL_SOURCE']}, which the copy reads"
            # It writes MODEL_TARGET: a writable volume that the main container reads at
            # EMBEDSTREAM_MODEL_DIR.
            target = writable(pod, init, ienv["MODEL_TARGET"])
            assert target["mountPath"] == ienv["MODEL_TARGET"]
            seen = holder(main, env["EMBEDSTREAM_MODEL_DIR"])
            assert seen is not None and seen["name"] == target["name"], name
            assert seen["mountPath"] == env["EMBEDSTREAM_MODEL_DIR"] and seen.get("readOnly")
            assert ienv["MODELS"].split() == json.loads(env["EMBEDSTREAM_MODELS"])
            checked += 1
        if "EMBEDSTREAM_MODEL_DIR" in env and not pod.get("initContainers"):
            mount = holder(main, env["EMBEDSTREAM_MODEL_DIR"])
            if mount is None:  # mode image: the models are the image's own files
                assert not main["image"].endswith(":0.1.0"), f"{name}: the runtime image has no models"
            else:
                assert "persistentVolumeClaim" in volume(pod, mount["name"]), (name, mount)
                assert mount["mountPath"] == env["EMBEDSTREAM_MODEL_DIR"] and mount["readOnly"]
            checked += 1
        if "--no-search" in main.get("args", []):
            assert "EMBEDSTREAM_MODEL_DIR" not in env and "initContainers" not in pod
        for var in SECRET_FILE_VARS:
            if var not in env:
                continue
            mount = holder(main, env[var])
            assert mount is not None, f"{name}: {var}={env[var]} is on no volume"
            files = provided_files(volume(pod, mount["name"]))
            relative = str(PurePosixPath(env[var]).relative_to(mount["mountPath"]))
            assert files is None or relative in files, (name, var, files)
        if "TensorrtExecutionProvider" in json.loads(env.get("EMBEDSTREAM_PROVIDERS", "[]")):
            for model in json.loads(env["EMBEDSTREAM_MODELS"]):
                mount = writable(pod, main, engine_cache(env, model, monkeypatch))
                assert mount["name"] == "tensorrt-cache", f"{name}: engines would fill /tmp's 256Mi"
                checked += 1
    assert checked, f"{values}: no model directory was checked"


def test_tensorrt_pools_have_an_engine_cache_and_a_start_up_budget(rendered):
    pod = rendered["gpu-values.yaml"]["es-embedstream-text-trt"]
    vol = volume(pod, "tensorrt-cache")
    assert vol["emptyDir"]["sizeLimit"] == "2Gi"
    probe = pod["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600
    cpu = rendered["gpu-values.yaml"]["es-embedstream-text-cpu"]["containers"][0]["startupProbe"]
    assert cpu["periodSeconds"] * cpu["failureThreshold"] < 600


# --- running the init containers' commands ------------------------------------------------

def rewriter(root: Path, paths: set[str]):
    """Rewrite the absolute paths a pod names (mounts, env values) to lie under ``root``."""
    known = sorted(paths, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w.$/-])(" + "|".join(re.escape(p) for p in known) + r")(?=$|[/\s\"'])")

    def rewrite(text: str) -> str:
        return pattern.sub(lambda m: str(root) + m.group(1), text) if known else text
    return rewrite


def fake_models(directory: Path, names: list[str]) -> None:
    """Exported model directories as the exporter lays them out (a manifest with the ONNX
    file's checksum), as the models image holds them."""
    for name in names:
        model = directory / name
        model.mkdir(parents=True)
        (model / "model.onnx").write_bytes(f"onnx graph of {name}".encode() * 100)
        Manifest(name=name, modality="text", dimension=4, pooling="mean", normalize=True,
                 inputs=["input_ids"], opset=17, sha256=file_sha256(model / "model.onnx")).write(model)


def shell_path(tmp_path: Path) -> str:
    """PATH for the command: busybox's applets when busybox is installed (the models image
    is busybox), else this machine's sh and coreutils."""
    busybox = shutil.which("busybox")
    if not busybox:
        return "/usr/bin:/bin"
    bin_dir = tmp_path / "busybox-bin"
    bin_dir.mkdir()
    for applet in ("sh", "cp", "ls", "echo", "[", "test", "mkdir", "cat"):
        (bin_dir / applet).symlink_to(busybox)
    return str(bin_dir)


def run_init_container(pod: dict[str, Any], tmp_path: Path, image_models: list[str],
                       image_source: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Lay out the init image and its mounts under tmp_path, run its command there."""
    (init,) = pod["initContainers"]
    root, volumes = tmp_path / "root", tmp_path / "volumes"
    fake_models(root / image_source.lstrip("/"), image_models)
    for mount in init["volumeMounts"]:
        vol = volumes / mount["name"]
        vol.mkdir(parents=True, exist_ok=True)
        where = root / mount["mountPath"].lstrip("/")
        if where.exists():
            shutil.rmtree(where)  # what the image had there is hidden by the mount
        where.parent.mkdir(parents=True, exist_ok=True)
        where.symlink_to(vol, target_is_directory=True)
    env = {k: v for k, v in env_of(init).items() if isinstance(v, str)}
    absolute = {m["mountPath"] for m in init["volumeMounts"]} | {
        v for v in env.values() if v.startswith("/")} | {image_source}
    rewrite = rewriter(root, absolute)
    command = [rewrite(part) for part in init["command"] + init.get("args", [])]
    proc = subprocess.run(command, env={"PATH": shell_path(tmp_path),
                                        **{k: rewrite(v) for k, v in env.items()}},
                          capture_output=True, text=True, timeout=60)
    return proc, volumes


def worker_view(pod: dict[str, Any], container: dict[str, Any], volumes: Path) -> Path:
    """What the container sees at its EMBEDSTREAM_MODEL_DIR: the models volume."""
    env = env_of(container)
    mount = holder(container, env["EMBEDSTREAM_MODEL_DIR"])
    assert mount is not None and mount["name"] == "models"
    return volumes / "models" / mount.get("subPath", "")


def assert_models_complete(directory: Path, names: list[str]) -> None:
    found = find_models(directory)  # the worker's own discovery
    missing = [n for n in names if n not in found]
    assert not missing, f"model(s) {missing} not in the worker's model directory ({sorted(found)})"
    for name in names:
        load_manifest(found[name], verify=True)  # complete: the ONNX file matches its checksum


INIT_CASES = [(values, name) for values, by_name in render_all().items()
              for name, pod in by_name.items() if pod.get("initContainers")]


@pytest.mark.parametrize("values,name", INIT_CASES, ids=[f"{v}:{n}" for v, n in INIT_CASES])
def test_init_container_fills_the_model_directory(rendered, values: str, name: str, tmp_path: Path):
    pod = rendered[values][name]
    main = pod["containers"][0]
    served = json.loads(env_of(main)["EMBEDSTREAM_MODELS"])
    # The models image holds what the exporter exported: the served models and another.
    source = env_of(pod["initContainers"][0])["MODEL_SOURCE"]
    proc, volumes = run_init_container(pod, tmp_path, [*served, "unserved-model"], source)
    assert proc.returncode == 0, proc.stderr
    view = worker_view(pod, main, volumes)
    assert_models_complete(view, served)
    assert "unserved-model" not in find_models(view)  # only the pool's models use its emptyDir


def test_init_container_names_a_model_its_image_lacks(rendered, tmp_path: Path):
    pod = rendered["gpu-values.yaml"]["es-embedstream-text-gpu"]
    proc, _ = run_init_container(pod, tmp_path, ["another-model"], "/models")
    assert proc.returncode != 0
    assert "model all-minilm-l6-v2 is not in" in proc.stderr


def test_the_simulation_catches_a_mount_over_the_source(rendered, tmp_path: Path):
    """The layout the chart used to render: the emptyDir over the image's /models."""
    pod = json.loads(json.dumps(rendered["gpu-values.yaml"]["es-embedstream-text-gpu"]))
    (init,) = pod["initContainers"]
    init["volumeMounts"][0]["mountPath"] = "/models"
    for var in init["env"]:
        if var["name"] == "MODEL_TARGET":
            var["value"] = "/models"
    _, volumes = run_init_container(pod, tmp_path, ["all-minilm-l6-v2"], "/models")
    with pytest.raises(AssertionError, match="not in the worker's model directory"):
        assert_models_complete(worker_view(pod, pod["containers"][0], volumes), ["all-minilm-l6-v2"])


def models_stage_cmd() -> tuple[list[str], dict[str, str]]:
    """The models image's CMD and ENV, from deploy/Dockerfile."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    stage = text[text.index("AS models"):text.index("AS runtime-baked")]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", stage, flags=re.M).group(1))
    env = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', re.search(r"^ENV (.*)$", stage, flags=re.M).group(1)))
    return cmd, {k: v.strip('"') for k, v in env.items()}


def test_models_image_default_command_matches_the_chart_and_copies(tmp_path: Path):
    """`docker run -v vol:/mnt/models embedstream-models` runs the same copy as the chart."""
    cmd, env = models_stage_cmd()
    values = load_values(ROOT / "helm" / "embedstream" / "values.yaml")
    assert cmd == values["modelDelivery"]["init"]["command"]
    assert env["MODEL_SOURCE"] == values["modelDelivery"]["init"]["sourcePath"]
    assert env["MODEL_TARGET"] == values["modelDelivery"]["init"]["targetPath"]
    pod = {"initContainers": [{"name": "models", "command": cmd,
                               "env": [{"name": k, "value": v} for k, v in env.items()],
                               "volumeMounts": [{"name": "models", "mountPath": env["MODEL_TARGET"]}]}]}
    proc, volumes = run_init_container(pod, tmp_path, ["all-minilm-l6-v2", "efficientnet-lite0"],
                                       env["MODEL_SOURCE"])
    assert proc.returncode == 0, proc.stderr
    assert_models_complete(volumes / "models", ["all-minilm-l6-v2", "efficientnet-lite0"])
