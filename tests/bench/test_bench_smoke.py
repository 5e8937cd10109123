"""``embedstream bench --smoke``: the whole bench runs and its figures are sane.

Timing targets are not tested here (the machine is shared and tiny runs are
noise); the structure, the rows and the quality of every row are.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

MODEL = "all-minilm-l6-v2"
ROWS = ["peer", "ort-fp32", "ort-int8", "pipeline-fp32", "pipeline-int8"]


def test_bench_smoke(model_root: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(model_root / MODEL, models / MODEL)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "embedstream", "--log-level", "WARNING", "bench", "--smoke",
         "--model-dir", str(models), "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "items/s" in proc.stdout and "pipeline-fp32" in proc.stdout

    report = json.loads(out.read_text())
    assert report["setup"]["texts"] == 48 and report["setup"]["model"] == MODEL
    rows = {r["row"]: r for r in report["rows"]}
    assert sorted(rows) == sorted(ROWS)
    for row in rows.values():
        assert row["items_per_s"] > 0 and row["tokens_per_s"] > row["items_per_s"]
        assert row["cos_mean"] >= 0.99 and row["cos_min"] >= 0.98
    for name in ("peer", "ort-fp32", "pipeline-fp32"):
        assert rows[name]["cos_min"] >= 0.9999
    for name in ("pipeline-fp32", "pipeline-int8"):
        row = rows[name]
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert 0 < row["batch_fill"] <= 1 and row["peak_rss_mb"] > 50
    assert report["targets"] and all("met" in t for t in report["targets"])


def test_bench_soak_samples_the_worker_memory_under_load(model_root: Path, tmp_path: Path) -> None:
    """``--soak``: a real worker under a steady load; its memory samples and the target."""
    models = tmp_path / "models"
    shutil.copytree(model_root / MODEL, models / MODEL)
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "embedstream", "--log-level", "WARNING", "bench", "--soak", "6",
         "--soak-rate", "10", "--soak-sample-s", "1", "--model-dir", str(models),
         "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker RSS" in proc.stdout

    report = json.loads(out.read_text())
    soak = report["soak"]
    assert soak["offered"] == 60 and soak["stored"] >= 60
    times = [t for t, _ in soak["samples"]]
    assert len(times) >= 6 and times == sorted(times) and times[-1] >= 5.5
    assert all(rss > 50 for _, rss in soak["samples"])  # a loaded model, not an empty process
    assert soak["growth"] == soak["final_mb"] / soak["baseline_mb"] - 1
    assert [t["target"] for t in report["targets"]] == [
        "worker memory flat under load (growth <= 5%)"]
