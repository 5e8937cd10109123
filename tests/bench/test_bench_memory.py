"""``embedstream bench --memory``: each row's resident memory in a fresh process.

Figures are not judged here (the machine is shared); the rows, their order of
events (loaded, ready, after the texts) and the per-model costs are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MODEL = "all-minilm-l6-v2"
SERVICES = Path(__file__).resolve().parents[2] / "services"


def test_bench_memory_smoke(model_root: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(model_root / MODEL, models / MODEL)
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, "-m", "embedstream", "--log-level", "WARNING", "bench", "--memory",
         "--smoke", "--threads", "2", "--model-dir", str(models), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        # This checkout's code, whichever copy of the package the environment installed.
        env={**os.environ, "PYTHONPATH": str(SERVICES)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ready MB" in proc.stdout and "x peer RSS" in proc.stdout

    report = json.loads(out.read_text())
    assert report["setup"]["texts"] == 48 and report["setup"]["batch_size"] == 16
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["peer", "worker", "worker-1"]
    assert rows["worker"]["instances"] == 2 and rows["worker-1"]["instances"] == 1
    for row in rows.values():
        assert row["models"] == [MODEL] and row["texts_per_s"] > 0
        # A loaded model, then at least as much once warmed, and the peak above both.
        assert 50 < row["load_mb"] <= row["ready_mb"] + 1 <= row["peak_mb"] + 1, row
        assert row["after_texts_mb"] <= row["peak_mb"] + 1
    for name in ("worker", "worker-1"):
        cost = rows[name]["per_model"][MODEL]
        assert cost["load_mb"] > 20 and cost["warmup_mb"] >= 0  # weights: 90 MB of fp32
    assert rows["peer"]["vs_peer"] == 1.0
    assert [t["target"] for t in report["targets"]] == [
        "worker RSS after warm-up <= peer's after the same batch, at >= its rate"]
