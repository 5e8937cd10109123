"""What the GPU check (:mod:`.gpu`) and its pipeline row (:mod:`.gpustack`) share: the
model's name, the repository root, the machine's environment, a child's error line and the
results file. The standard library and numpy only, like them: it runs on the GPU
machine with nothing of embedstream's dependencies installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "all-minilm-l6-v2"
PACKAGES = ("numpy", "torch", "transformers", "sentence_transformers", "tokenizers", "onnx",
            "onnxruntime", "safetensors", "pydantic", "pydantic_settings", "redis", "kafka",
            "confluent_kafka", "prometheus_client")
"""Reported with their versions; the rows need the first seven."""
REPO = Path(__file__).resolve().parents[3]
"""The repository root (this file is ``services/embedstream/bench/gpuenv.py``)."""


def environment() -> dict[str, Any]:
    """Python, packages, ONNX Runtime's providers and the GPUs, whatever of it there is."""
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "cpus": os.cpu_count(), "packages": {}, "missing": {}}
    distributions = importlib.metadata.packages_distributions()
    for name in PACKAGES:
        # Found and versioned without importing: the rows' own processes import what they
        # need, and report an install that is there but broken.
        if importlib.util.find_spec(name) is None:
            env["missing"][name] = "not installed"
            continue
        try:
            env["packages"][name] = importlib.metadata.version(distributions[name][0])
        except (KeyError, IndexError, importlib.metadata.PackageNotFoundError):
            env["packages"][name] = "?"
    if "onnxruntime" in env["packages"]:
        import onnxruntime

        env["ort_providers"] = list(onnxruntime.get_available_providers())
        env["ort_device"] = str(onnxruntime.get_device())
    else:
        env["ort_providers"] = []
    env["nvidia_smi"] = nvidia_smi(["--query-gpu=name,memory.total,driver_version",
                                     "--format=csv,noheader"])
    env["cuda"] = _torch_cuda() if "torch" in env["packages"] else None
    return env


def nvidia_smi(query: list[str]) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=20,
                              check=False)
    except (OSError, subprocess.SubprocessError) as err:
        return f"failed: {err}"
    return done.stdout.strip() or done.stderr.strip()


def _torch_cuda() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "torch_cuda": torch.version.cuda}
    props = torch.cuda.get_device_properties(0)
    return {"available": True, "device": torch.cuda.get_device_name(0),
            "memory_gib": round(props.total_memory / 2**30, 1), "torch_cuda": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.asarray(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12))


def error_line(stderr: str) -> str:
    """The exception line of a child's traceback (what follows it may be a printed tensor),
    else its last line."""
    lines = stderr.strip().splitlines()
    found = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Fail)\b", line)]
    return (found[-1] if found else (lines[-1] if lines else "no output"))[:600]


def write_results(out: Path, report: dict[str, Any]) -> None:
    """results.json, rewritten after every step: a run cut short keeps what it measured."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    tmp.replace(out / "results.json")
