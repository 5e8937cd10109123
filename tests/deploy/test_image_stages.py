"""Each Python stage of the images, installed the way its Dockerfile installs it, runs what
its containers run.

No container runtime here, so the stage's Python installs are replayed into a fresh
virtual environment: the embedstream wheel built from exactly the files the Dockerfile's
build stage copies, then every `pip install` / `pip uninstall` of the stage's RUN lines,
in order, with its extras, the constraints file and the build arguments' defaults (uv
stands in for pip: same packages, same pins, much faster; one environment per stage).
Then, in that environment: `embedstream <command> --help` for every command that compose,
the Helm chart or the image's CMD runs from that stage; an import of every module those
commands can load (with no torch); the worker and the gateway started for real up to the
point where they need models or a broker; and for the GPU stage, the onnxruntime-gpu build
checked against the image's CUDA base and TensorRT, and a worker asked for the CUDA
provider, which cannot start on this machine, refusing to run instead of falling back.

What is left out, and why: the `exporter` stage installs torch from the PyTorch CPU index,
which CI cannot reach; the `export` extra it installs is the development environment's
own and is exercised by tests/export. The GPU stage's optional TensorRT libraries come from
pypi.nvidia.com (NVIDIA's stub on PyPI fetches them), also out of reach: their pin is
checked by test_pins.py, their major version against what onnxruntime-gpu links here. The
environments use this machine's Python (the CPU images use 3.11 too; the GPU image's Ubuntu
base has 3.12, whose wheels test_pins.py checks exist).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from deploy_manifests import CI_VALUES, ROOT, load_values, render
from dockerfiles import DEPLOY, base_image, build_args, python_installs, stages

from embedstream.models.manifest import Manifest, file_sha256

# The Python stages replayed here (runtime-baked is runtime plus the model files).
STAGES = {"runtime": DEPLOY / "Dockerfile", "runtime-gpu": DEPLOY / "Dockerfile.gpu"}
NOT_REPLAYED = {
    "exporter": "torch from the PyTorch CPU index, unreachable in CI (tests/export covers it)",
    "build": "pip wheel only: replayed as the wheel build",
}
# What each command may load: embedstream packages and modules (all of their submodules).
COMMAND_MODULES = {
    "worker": ["cli", "settings", "sections", "errors", "metrics", "records", "envelope", "cloudevent",
               "worker", "sources", "sinks", "preprocess", "runtime", "batching", "payloads",
               "models", "retry", "rollout"],
    "gateway": ["cli", "settings", "sections", "errors", "metrics", "records", "envelope", "cloudevent",
                "gateway", "search", "producer", "preprocess", "runtime", "batching", "sinks",
                "sources", "payloads", "models", "retry", "rollout"],
    "produce": ["cli", "settings", "sections", "errors", "records", "envelope", "cloudevent", "producer",
                "sources"],
}
UNREACHABLE_BROKER = "127.0.0.1:9"  # the discard port: refused at once


def uv_binary() -> str:
    try:
        from uv import find_uv_bin
        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        assert found, "uv is missing: it comes with the dev extra (pip install -e '.[dev]')"
        return found


def uv(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([uv_binary(), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "UV_NO_PROGRESS": "1"})
    assert proc.returncode == 0, f"uv {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def wheel(workdir: Path) -> Path:
    """The wheel as the build stage makes it: from the files it COPYs, nothing else."""
    src = workdir / "src"
    src.mkdir()
    for keyword, args in stages(DEPLOY / "Dockerfile")["build"]:
        if keyword == "COPY":
            *sources, dest = args.split()
            for source in sources:
                target = src / dest / Path(source).name if dest.endswith("/") else src / dest
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(ROOT / source, target)
    uv("build", "--quiet", "--wheel", "--out-dir", str(workdir / "wheels"), str(src))
    (built,) = (workdir / "wheels").glob("embedstream-*.whl")
    return built


@pytest.fixture(scope="module")
def environments(workdir: Path, wheel: Path) -> dict[str, Path]:
    """stage -> the python of a fresh environment holding what the stage installs."""
    made: dict[str, Path] = {}
    for stage, dockerfile in STAGES.items():
        started = time.monotonic()
        venv = workdir / f"venv-{stage}"
        uv("venv", "--quiet", "--python", sys.executable, str(venv))
        python = venv / "bin" / "python"
        installs = python_installs(dockerfile, stage, str(wheel), str(ROOT / "constraints.txt"))
        for action, words in installs.steps:
            uv("pip", action, "--quiet", "--python", str(python),
               *[w for w in words if w != "-y"])
        print(f"{stage}: {len(installs.steps)} install steps in {time.monotonic() - started:.1f}s")
        made[stage] = python
    return made


def test_every_python_stage_is_replayed_or_says_why():
    for dockerfile in STAGES.values():
        for stage, body in stages(dockerfile).items():
            installs = any(k == "RUN" and re.search(r"\bpip (install|wheel)\b", a) for k, a in body)
            if installs:
                assert stage in STAGES or stage in NOT_REPLAYED, stage


def test_only_the_optional_tensorrt_install_is_skipped():
    installs = python_installs(STAGES["runtime-gpu"], "runtime-gpu", "w.whl", "c.txt")
    (skipped,) = installs.skipped
    assert 'if [ "false" = "true" ]' in skipped and "tensorrt" in skipped
    assert not python_installs(STAGES["runtime"], "runtime", "w.whl", "c.txt").skipped
    assert [a for a, _ in installs.steps] == ["install", "uninstall", "install"]


@functools.cache
def stage_commands() -> dict[str, set[str]]:
    """The embedstream commands each stage's containers run: its CMD, compose's services
    built from it, and the chart's containers using its image."""
    out: dict[str, set[str]] = {}
    for stage, dockerfile in STAGES.items():
        cmd = next(json.loads(a) for k, a in stages(dockerfile)[stage] if k == "CMD")
        out[stage] = {cmd[0]}
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for service in compose["services"].values():
        if service.get("build", {}).get("target") in ("runtime", "runtime-baked"):
            out["runtime"].add(service["command"][0])
    for values in [None, *CI_VALUES]:
        for doc in render(load_values(values) if values else None):
            if doc["kind"] != "Deployment":
                continue
            for container in doc["spec"]["template"]["spec"]["containers"]:
                stage = "runtime-gpu" if "embedstream-gpu" in container["image"] else "runtime"
                out[stage].add(container["args"][0])
    return out


def test_the_commands_found_are_the_expected_ones():
    assert stage_commands() == {"runtime": {"worker", "gateway", "produce"}, "runtime-gpu": {"worker"}}


CASES = [(stage, command) for stage, commands in stage_commands().items() for command in sorted(commands)]


def modules_of(command: str) -> list[str]:
    """Every module under the command's packages, from the source tree."""
    package = ROOT / "services" / "embedstream"
    names = ["embedstream"]
    for entry in COMMAND_MODULES[command]:
        path = package / entry
        if path.is_dir():
            names += [f"embedstream.{entry}." + ".".join(p.relative_to(path).with_suffix("").parts)
                      for p in sorted(path.rglob("*.py")) if p.name != "__init__.py"]
            names.append(f"embedstream.{entry}")
        else:
            names.append(f"embedstream.{entry}")
    return names


def run_in(python: Path, *args: str, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("EMBEDSTREAM_", "PYTHON", "VIRTUAL_ENV"))}
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=timeout,
                          env={**clean, "EMBEDSTREAM_KAFKA_BOOTSTRAP": UNREACHABLE_BROKER,
                               "EMBEDSTREAM_REDIS_URL": "redis://127.0.0.1:9/0", **(env or {})})


@pytest.mark.parametrize("stage,command", CASES, ids=[f"{s}:{c}" for s, c in CASES])
def test_command_runs_and_its_modules_import(environments, stage: str, command: str):
    python = environments[stage]
    entry = python.parent / "embedstream"  # the console script the image's ENTRYPOINT runs
    proc = subprocess.run([str(entry), command, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: embedstream {command}" in proc.stdout
    modules = modules_of(command)
    check = ("import importlib, sys\n"
             f"for name in {modules!r}:\n"
             "    importlib.import_module(name)\n"
             "assert 'torch' not in sys.modules, 'the runtime must not import torch'\n"
             "print(len(sys.modules))\n")
    proc = run_in(python, "-c", check)
    assert proc.returncode == 0, proc.stderr[-3000:]


STARTS = {
    # The worker and the gateway load models before anything else that needs the outside
    # world: with none, each stops there with a configuration error (exit 2), having
    # imported and run everything before it.
    "worker": (["worker", "--metrics-port", "0"], "no models under"),
    "gateway": (["gateway", "--port", "0"], "no models under"),
}
START_CASES = [(s, c) for s, c in CASES if c in STARTS]


@pytest.mark.parametrize("stage,command", START_CASES, ids=[f"{s}:{c}" for s, c in START_CASES])
def test_command_starts_until_it_needs_models(environments, stage: str, command: str, tmp_path: Path):
    args, expected = STARTS[command]
    loaded = tmp_path / "modules.json"
    script = ("import atexit, json, sys\n"
              f"atexit.register(lambda: open({str(loaded)!r}, 'w').write(json.dumps(sorted(sys.modules))))\n"
              "from embedstream.cli import main\n"
              f"sys.exit(main({[*args, '--model-dir', str(tmp_path / 'empty')]!r}))\n")
    proc = run_in(environments[stage], "-c", script)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr
    ours = {m for m in json.loads(loaded.read_text()) if m.startswith("embedstream")}
    assert ours - set(modules_of(command)) == set(), "modules the command loads but the test does not import"
    assert "torch" not in json.loads(loaded.read_text())


# --- the GPU stage ----------------------------------------------------------------------

def needed_libraries(path: Path) -> list[str]:
    """DT_NEEDED entries of an ELF64 little-endian shared library (what it links)."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, path
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
    strtab = sections[dynamic[6]]  # sh_link: its string table
    needed = []
    for offset in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, offset)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + value
            needed.append(data[start:data.index(b"\0", start)].decode())
    return needed


def test_gpu_stage_matches_its_cuda_base_and_tensorrt(environments):
    python = environments["runtime-gpu"]
    proc = run_in(python, "-c", (
        "import json, onnxruntime as ort, os\n"
        "from onnxruntime.capi import build_and_package_info as info\n"
        "print(json.dumps({'cuda': info.cuda_version, 'package': info.package_name,\n"
        "  'providers': ort.get_available_providers(),\n"
        "  'capi': os.path.dirname(info.__file__)}))\n"))
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    args = build_args(STAGES["runtime-gpu"])
    base = base_image(STAGES["runtime-gpu"], "runtime-gpu")
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-", base)
    assert cuda, base
    base_major, base_minor = int(cuda.group(1)), int(cuda.group(2))
    built_major, built_minor = (int(x) for x in found["cuda"].split(".")[:2])
    print(f"base {base}; onnxruntime-gpu {args['ORT_GPU_VERSION']} built for CUDA {found['cuda']}")
    assert found["package"] == "onnxruntime-gpu"
    # The same CUDA major, and a base at least as new as the build's CUDA.
    assert built_major == base_major and built_minor <= base_minor
    capi = Path(found["capi"])
    cuda_libs = needed_libraries(capi / "libonnxruntime_providers_cuda.so")
    assert f"libcudart.so.{base_major}" in cuda_libs and f"libcublas.so.{base_major}" in cuda_libs
    assert "libcudnn.so.9" in cuda_libs  # the base's cuDNN 9
    trt_libs = needed_libraries(capi / "libonnxruntime_providers_tensorrt.so")
    trt_major = args["TENSORRT_VERSION"].split(".")[0]
    assert f"libnvinfer.so.{trt_major}" in trt_libs and f"libnvonnxparser.so.{trt_major}" in trt_libs
    assert args["TENSORRT_PACKAGE"] == f"tensorrt-cu{base_major}-libs"
    # The providers the chart's GPU pools name are in the build.
    assert {"TensorrtExecutionProvider", "CUDAExecutionProvider"} <= set(found["providers"])


def tiny_model(root: Path) -> Path:
    """A one-node ONNX model with its manifest: enough for the runtime to open a session."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["embedding"])], "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory = root / "tiny"
    directory.mkdir(parents=True)
    onnx.save(model, str(directory / "model.onnx"))
    Manifest(name="tiny", modality="text", dimension=4, pooling="mean", normalize=True,
             inputs=["input_ids"], opset=17, sha256=file_sha256(directory / "model.onnx"),
             ).write(directory)
    return root


@pytest.mark.parametrize("providers", ["CUDAExecutionProvider",
                                       "TensorrtExecutionProvider,CUDAExecutionProvider"])
def test_gpu_stage_worker_refuses_providers_it_cannot_start(environments, tmp_path: Path,
                                                            providers: str):
    """onnxruntime-gpu lists the CUDA provider here, but CUDA does not load on this machine
    (no libraries, no GPU): the session would run on the CPU. The worker exits instead."""
    root = tiny_model(tmp_path / "models")
    proc = run_in(environments["runtime-gpu"], "-m", "embedstream", "worker", "--metrics-port", "0",
                  "--model-dir", str(root), "--models", "tiny", "--providers", providers,
                  env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "refusing to fall back silently" in proc.stderr, proc.stderr[-3000:]
    assert providers.split(",")[0] in proc.stderr


def test_cpu_stage_worker_refuses_a_gpu_provider(environments, tmp_path: Path):
    root = tiny_model(tmp_path / "models")
    proc = run_in(environments["runtime"], "-m", "embedstream", "worker", "--metrics-port", "0",
                  "--model-dir", str(root), "--models", "tiny", "--providers", "CUDAExecutionProvider")
    assert proc.returncode == 2
    assert "not available in this onnxruntime build" in proc.stderr
