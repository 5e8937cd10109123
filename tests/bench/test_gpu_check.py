"""``scripts/gpu-check``: everything of it that runs without a GPU.

``prepare`` writes what a GPU machine needs under the size one call can carry;
``run --quick`` goes end to end on this CPU-only machine: the environment, the
export of the carried checkpoint, the rows the CPU can run with their cosine to
the PyTorch reference, and every CUDA / TensorRT row reported unavailable with
the reason. Run as the GPU machine runs it: a fresh ``python3`` on the script,
no package of ours installed, no PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embedstream.bench import gpu

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check"


def _script(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


@pytest.mark.slow
def test_prepare_then_run_quick_on_a_cpu(tmp_path: Path) -> None:
    carry, work, out = tmp_path / "carry", tmp_path / "work", tmp_path / "out"
    prepared = _script("prepare", "--carry", str(carry), cwd=tmp_path, timeout=120)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "one call carries" in prepared.stdout
    checkpoint = carry / gpu.CHECKPOINT
    weights = checkpoint / "model.safetensors"
    assert 40 << 20 < weights.stat().st_size < 50 << 20  # fp16: half the 91 MB checkpoint
    assert (checkpoint / "tokenizer.json").is_file() and (checkpoint / "modules.json").is_file()
    # Stored in fp16, loaded in fp32 by every fp32 row (transformers 5 keeps the stored dtype
    # unless the config names one).
    assert json.loads((checkpoint / "config.json").read_text())["torch_dtype"] == "float32"
    total = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    assert total + gpu._working_tree_bytes(carry) <= gpu.CARRY_LIMIT
    info = json.loads((carry / "carry.json").read_text())
    assert info["files"][f"{gpu.CHECKPOINT}/model.safetensors"] == gpu._sha256(weights)

    rows = "peer-cpu-fp32,ort-cpu-fp32,peer-cuda-fp32,ort-cuda-fp16,ort-trt-fp16"
    ran = _script("run", "--quick", "--exporter", "minimal", "--rows", rows, "--carry",
                  str(carry), "--work", str(work), "--out", str(out), cwd=tmp_path, timeout=240)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert "onnxruntime providers: " in ran.stdout and "texts/s" in ran.stdout

    report = json.loads((out / "results.json").read_text())
    assert report["environment"]["ort_providers"] and "CPUExecutionProvider" in (
        report["environment"]["ort_providers"])
    assert report["model"]["status"] == "ok" and report["model"]["exporter"].startswith("minimal")
    by_name = {r["row"]: r for r in report["rows"]}
    assert sorted(by_name) == sorted(rows.split(","))
    peer, ort = by_name["peer-cpu-fp32"], by_name["ort-cpu-fp32"]
    assert peer["reference"] and not ort["reference"]
    for row in (peer, ort):
        assert row["status"] == "ok" and row["texts"] == 64 and row["batch_size"] == 32
        assert row["texts_per_s"] > 0 and row["cos_min"] >= 0.9999, row
    assert ort["model_texts_per_s"] >= ort["texts_per_s"] and ort["tokens_per_s"] > ort["texts_per_s"]
    assert ort["provider"] == "CPUExecutionProvider"
    for name in ("peer-cuda-fp32", "ort-cuda-fp16", "ort-trt-fp16"):
        assert by_name[name]["status"].startswith("unavailable: "), by_name[name]
        assert by_name[name]["texts_per_s"] is None
    assert [t["met"] for t in report["targets"]] == [True]  # ort-cpu-fp32 against the peer
    vectors = np.load(work / "vectors" / "ort-cpu-fp32-32.npy")
    assert vectors.shape == (64, 384)

    # A second run on the same machine reuses the export (a rerun after a cut-short call).
    again = _script("run", "--quick", "--exporter", "minimal", "--rows", "ort-cuda-fp32",
                    "--carry", str(carry), "--work", str(work), "--out", str(out), cwd=tmp_path,
                    timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["model"]["reused"] is True


def test_run_without_a_carried_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    ran = _script("run", "--quick", "--rows", "ort-cpu-fp32", "--carry", str(tmp_path / "none"),
                  "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), cwd=tmp_path,
                  timeout=120)
    assert ran.returncode == 1
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "prepare" in report["model"]["status"] and report["rows"] == []


def test_a_row_that_outlives_its_time_is_killed_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check must never hang: a child that does not finish in time is killed.
    monkeypatch.setattr(gpu, "_child_command", lambda command, spec: ["/bin/sleep", "30"])
    outcome = gpu._child("_row", {}, timeout_s=1)
    assert outcome["error"].startswith("timed out") and outcome["wall_s"] < 10


def test_tensorrt_rows_get_one_shape_profile_up_to_the_batch_and_token_limit() -> None:
    options = gpu._trt_options({"batch_size": 256, "precision": "fp16", "work": "/w",
                                "name": "ort-trt-fp16"}, ["input_ids", "attention_mask"], 256)
    assert options["trt_profile_max_shapes"] == "input_ids:256x256,attention_mask:256x256"
    assert options["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"
    assert options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_path"] == "/w/trt/ort-trt-fp16"


# --- the optional pipeline row ----------------------------------------------------------


def test_the_stack_archive_round_trips_and_only_fills_what_the_machine_lacks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedstream.bench import gpustack

    fake_site = tmp_path / "fake-site"
    (fake_site / "zz_carried_only").mkdir(parents=True)
    (fake_site / "zz_carried_only" / "__init__.py").write_text("WHERE = 'carried'\n")
    monkeypatch.syspath_prepend(str(fake_site))
    monkeypatch.setattr(gpustack, "_BINARY_PACKAGES", {})
    monkeypatch.setattr(gpustack, "_PYTHON_PACKAGES", ("zz_carried_only", "dotenv"))
    info = gpustack.prepare_stack(tmp_path / "stack")
    assert info["packages"] == ["zz_carried_only", "dotenv"] and info["bytes"] > 0
    monkeypatch.syspath_prepend(str(tmp_path / "nowhere"))
    monkeypatch.delitem(sys.modules, "zz_carried_only", raising=False)
    sys.path.remove(str(fake_site))  # the GPU machine: it has dotenv, not zz_carried_only

    layer, chosen = gpustack.overlay(tmp_path / "work", tmp_path / "stack" / gpustack.ARCHIVE)
    assert chosen == {"dotenv": "the machine's own", "zz_carried_only": "carried"}
    assert sorted(p.name for p in layer.iterdir()) == ["zz_carried_only"]
    assert (layer / "zz_carried_only" / "__init__.py").read_text() == "WHERE = 'carried'\n"
    # Unpacked once: a second call (a rerun on the same machine) reuses it.
    stamp = tmp_path / "work" / "stack" / "unpacked"
    before = stamp.stat().st_mtime_ns
    gpustack.overlay(tmp_path / "work", tmp_path / "stack" / gpustack.ARCHIVE)
    assert stamp.stat().st_mtime_ns == before


def test_pipeline_row_quick_on_a_cpu(model_root: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from embedstream.bench import gpustack

    work = tmp_path / "work"
    shutil.copytree(model_root / gpu.MODEL, work / "models" / gpu.MODEL)
    monkeypatch.setattr(gpustack, "_BINARY_PACKAGES", {})
    monkeypatch.setattr(gpustack, "_PYTHON_PACKAGES", ("dotenv",))  # this machine has all
    gpustack.prepare_stack(tmp_path / "stack")
    ran = _script("pipeline", "--quick", "--work", str(work), "--stack", str(tmp_path / "stack"),
                  "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=240)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["status"] == "ok" and report["row"] == "pipeline-cpu-fp32"
    assert report["texts"] == 64 and report["texts_per_s"] > 0 and report["stored_per_s"] > 0
    assert 0 < report["p50_ms"] <= report["p99_ms"] and report["worker_peak_rss_mb"] > 50
    assert report["modules"] == {"dotenv": "the machine's own"}
    assert "cos_min" not in report  # no raw rows ran in this work folder: no reference
