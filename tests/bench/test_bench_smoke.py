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


def test_bench_clients_smoke(tmp_path: Path) -> None:
    out = tmp_path / "clients.json"
    proc = subprocess.run(
        [sys.executable, "-m", "embedstream", "--log-level", "WARNING", "bench", "--clients",
         "--smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "msg/s" in proc.stdout and "ConfluentSource.poll" in proc.stdout

    report = json.loads(out.read_text())
    assert report["setup"]["messages"] == 2000 and report["setup"]["value_bytes"] == [200, 1024]
    rows = report["rows"]
    seen = {(r["client"], r["op"], r["value_bytes"]) for r in rows}
    for size in (200, 1024):
        for client in ("kafka-python", "confluent-kafka"):
            assert {(client, "produce", size), (client, "consume", size)} <= seen
        assert {("KafkaSource.poll", "consume", size), ("ConfluentSource.poll", "consume", size)} <= seen
    for row in rows:
        assert row["messages"] == 2000, row  # every message produced, and every one consumed
        assert row["msg_per_s"] > 0 and row["mb_per_s"] > 0 and row["cpu_us_per_msg"] > 0, row
        assert 0 < row["timed"] <= row["messages"]
    assert report["unavailable"].get("aiokafka") in (None, "not installed")
    assert len(report["verdicts"]) == sum(r["op"] == "consume" for r in rows)
