"""``embedstream bench --smoke``: the whole bench runs and its figures are sane.

Timing targets are not tested here (the machine is shared and tiny runs are
noise); the structure, the rows and the quality of every row are. The image
and audio runs start from an empty model root, so they also cover the
bench's first-run export of the default model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

MODEL = "all-minilm-l6-v2"
ROWS = ["peer", "ort-fp32", "ort-int8", "pipeline-fp32", "pipeline-int8"]


MEDIA_ROWS = ["peer", "ort-fp32", "pipeline-fp32"]


def _bench(models: Path, tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """Run ``embedstream bench --smoke`` in a subprocess; its stdout and its JSON report."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "embedstream", "--log-level", "WARNING", "bench", "--smoke",
         "--model-dir", str(models), "--json", str(out), *args],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_bench_smoke(model_root: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(model_root / MODEL, models / MODEL)
    stdout, report = _bench(models, tmp_path)
    assert "items/s" in stdout and "pipeline-fp32" in stdout

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


@pytest.mark.parametrize(("modality", "model", "count_key"), [
    ("image", "efficientnet-lite0", "images"),
    ("audio", "aisfx", "clips"),
])
def test_bench_smoke_media(modality: str, model: str, count_key: str, tmp_path: Path) -> None:
    stdout, report = _bench(tmp_path / "models", tmp_path, "--modality", modality)
    assert "pipeline-fp32" in stdout and ("audio s/s" in stdout) == (modality == "audio")

    setup = report["setup"]
    assert setup["modality"] == modality and setup["model"] == model
    assert setup[count_key] == 16 and setup["ort_fp32_preprocess_s"] > 0
    rows = {r["row"]: r for r in report["rows"]}
    assert sorted(rows) == sorted(MEDIA_ROWS)
    for row in rows.values():
        assert row["items_per_s"] > 0 and row["tokens_per_s"] is None
        if modality == "audio":
            assert row["audio_s_per_s"] > row["items_per_s"] * 0.5  # clips of 0.5-10 s
        assert row["cos_min"] >= 0.9999, row
    pipe = rows["pipeline-fp32"]
    assert 0 < pipe["p50_ms"] <= pipe["p95_ms"] <= pipe["p99_ms"]
    assert 0 < pipe["batch_fill"] <= 1 and pipe["peak_rss_mb"] > 50
    assert len(report["targets"]) == 3 and all("met" in t for t in report["targets"])
