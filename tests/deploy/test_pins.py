"""Every pinned version the images and the development environment install exists on the
package index for the platform that installs it, so an impossible pin fails here, not in
a user's `docker build`.

For each pin the index's file list (the simple API that pip reads) must hold, for exactly
that version, a wheel whose tags the target accepts (pip's own tag rules, `packaging.tags`)
or a source distribution, and none of them yanked: what `pip download --no-deps` of the pin
would find for that platform, without downloading gigabytes (torch, onnxruntime-gpu) on
every run. Targets: this project's CPU images and the development machine (CPython 3.11,
glibc 2.36: Debian bookworm) and the GPU image (its Ubuntu base's CPython and glibc). The
pins: constraints.txt, the `==` pins of pyproject.toml (which must agree with it), and the
versions the Dockerfiles name in their build arguments.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import tomllib
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
from deploy_manifests import ROOT
from dockerfiles import DEPLOY, base_image, build_args, python_installs
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import Version

INDEX = (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")
# Base image -> (CPython version, glibc version) of what it runs.
BASES = {
    r"^python:3\.11(\.\d+)?-slim-bookworm$": ((3, 11), (2, 36)),
    r"^nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu24\.04$": ((3, 12), (2, 39)),
}


@dataclass(frozen=True)
class Target:
    name: str
    python: tuple[int, int]
    glibc: tuple[int, int]

    @functools.cached_property
    def tags(self) -> frozenset[Tag]:
        major, minor = self.glibc
        platforms = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
        platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
                      "linux_x86_64"]
        interpreter = f"cp{self.python[0]}{self.python[1]}"
        return frozenset([*cpython_tags(self.python, platforms=platforms),
                          *compatible_tags(self.python, interpreter, platforms)])


def target_of(dockerfile: Path, stage: str) -> Target:
    image = base_image(dockerfile, stage)
    for pattern, (python, glibc) in BASES.items():
        if re.match(pattern, image):
            return Target(image, python, glibc)
    raise AssertionError(f"{image}: add its Python and glibc to BASES")


CPU = target_of(DEPLOY / "Dockerfile", "runtime")
GPU = target_of(DEPLOY / "Dockerfile.gpu", "runtime-gpu")


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


@functools.cache
def index_files(name: str) -> list[dict]:
    """The index's files of a project (PEP 691 JSON, or the PEP 503 HTML page)."""
    request = urllib.request.Request(
        f"{INDEX}/{canonicalize_name(name)}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read().decode()
        if "json" in response.headers.get("Content-Type", ""):
            return json.loads(body)["files"]
    return [{"filename": m.group(2), "yanked": m.group(1) is not None}
            for m in re.finditer(r"<a [^>]*?(data-yanked[^>]*)?>([^<]+)</a>", body)]


def availability(name: str, version: str, target: Target) -> tuple[str, list[str]]:
    """'wheel', 'sdist' or 'missing' for the pin on the target, and its yanked files."""
    wanted = Version(version)
    kinds, yanked = set(), []
    for file in index_files(name):
        filename = file["filename"]
        try:
            if filename.endswith(".whl"):
                _, found, _, tags = parse_wheel_filename(filename)
                kind = "wheel" if tags & target.tags else None
            else:
                _, found = parse_sdist_filename(filename)
                kind = "sdist"
        except (InvalidWheelFilename, InvalidSdistFilename):
            continue
        if found != wanted:
            continue
        if file.get("yanked"):
            yanked.append(filename)
        elif kind:
            kinds.add(kind)
    return ("wheel" if "wheel" in kinds else "sdist" if kinds else "missing"), yanked


def runtime_closure(extras: set[str], python: tuple[int, int]) -> set[str]:
    """Distributions `embedstream[extras]` installs on that Python (markers evaluated for it),
    from the metadata of the installed packages of this environment (which holds them all)."""
    # A current patch release (markers such as `python_full_version < "3.11.3"` exist).
    env = {**default_environment(), "python_version": f"{python[0]}.{python[1]}",
           "python_full_version": f"{python[0]}.{python[1]}.99", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64"}
    seen: set[str] = set()
    todo = [(canonicalize_name("embedstream"), frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            marker_ok = [req.marker is None or req.marker.evaluate({**env, "extra": e})
                         for e in (wanted or {""})]
            if any(marker_ok) and canonicalize_name(req.name) not in seen:
                seen.add(canonicalize_name(req.name))
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return seen


def check(pins: dict[str, str], target: Target) -> dict[str, tuple[str, list[str]]]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = pool.map(lambda item: availability(*item, target), pins.items())
        return dict(zip(pins, results, strict=True))


def assert_available(pins: dict[str, str], target: Target) -> dict[str, str]:
    results = check(pins, target)
    bad = {f"{n}=={pins[n]}": r for n, r in results.items() if r[0] == "missing" or r[1]}
    assert not bad, f"pins with no file for {target.name} (or yanked): {bad}"
    return {n: kind for n, (kind, _) in results.items()}


@pytest.mark.slow
def test_constraints_pins_exist_for_the_cpu_images_and_this_machine():
    kinds = assert_available(constraints(), CPU)
    print(f"{len(kinds)} pins on {CPU.name}: {sum(k == 'wheel' for k in kinds.values())} wheels, "
          f"sdists only: {sorted(n for n, k in kinds.items() if k == 'sdist')}")


def gpu_pins() -> dict[str, str]:
    """What the GPU image installs: the wheel with its extras, minus onnxruntime, plus the
    pins its build arguments name (TensorRT too, though it is optional)."""
    dockerfile = DEPLOY / "Dockerfile.gpu"
    installs = python_installs(dockerfile, "runtime-gpu", "w.whl", "c.txt")
    pins = {n: v for n, v in constraints().items() if n in runtime_closure(installs.extras, GPU.python)}
    pins.pop("onnxruntime")  # uninstalled for onnxruntime-gpu
    args = build_args(dockerfile)
    pins["onnxruntime-gpu"] = args["ORT_GPU_VERSION"]
    pins[args["TENSORRT_PACKAGE"]] = args["TENSORRT_VERSION"]
    return pins


def test_gpu_image_pins_exist_for_its_python_and_glibc():
    kinds = assert_available(gpu_pins(), GPU)
    assert kinds["onnxruntime-gpu"] == "wheel"
    # NVIDIA publishes the TensorRT libraries on PyPI as a stub source distribution that
    # downloads the wheel from pypi.nvidia.com when installed: its pin exists, its wheel is
    # checked only where that index is reachable (a docker build).
    print(f"{len(kinds)} pins on {GPU.name}; sdists only: "
          f"{sorted(n for n, k in kinds.items() if k == 'sdist')}")


def test_the_check_refuses_an_impossible_pin():
    # The GPU image once pinned onnxruntime-gpu to the CPU package's version.
    assert availability("onnxruntime-gpu", "1.32.0", GPU)[0] == "missing"
    assert availability("onnxruntime", "1.32.0", GPU)[0] == "wheel"
    assert availability("onnxruntime-gpu", "1.26.0", Target("musl", (3, 12), (2, 0)))[0] == "missing"


def test_every_package_the_images_install_is_pinned():
    """A package the images install without a pin would float between builds."""
    pins = constraints()
    for dockerfile, stage, target in [(DEPLOY / "Dockerfile", "runtime", CPU),
                                      (DEPLOY / "Dockerfile.gpu", "runtime-gpu", GPU)]:
        installs = python_installs(dockerfile, stage, "w.whl", "c.txt")
        closure = runtime_closure(installs.extras, target.python)
        assert closure - set(pins) == set(), (stage, closure - set(pins))


def test_pyproject_pins_agree_with_the_constraints():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"],
                    *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pins = constraints()
    for text in requirements:
        req = Requirement(text)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            assert pins.get(canonicalize_name(req.name)) == exact[0], text


@pytest.mark.parametrize("target", [CPU, GPU], ids=["cpu", "gpu"])
def test_targets_are_known(target: Target):
    assert target.tags and Tag(f"cp{target.python[0]}{target.python[1]}",
                               f"cp{target.python[0]}{target.python[1]}",
                               f"manylinux_2_{target.glibc[1]}_x86_64") in target.tags
