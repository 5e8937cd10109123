"""``embedstream bench --smoke``: the whole bench runs and its figures are sane.

Timing targets are not tested here (the machine is shared and tiny runs are
noise); the structure, the rows and the quality of every row are. The image
and audio runs start from an empty model root, so they also cover the
bench's first-run export of the default model.
"""

from __future__ import annotations

import json
import os
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


@pytest.mark.slow
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
        # Where the time went: real processes' CPU and the worker's own stage clocks.
        b = row["breakdown"]
        # A smoke run's window is a fraction of a second: CPU ticks (10 ms) may read 0.
        assert b["wall_s"] > 0 and 0 <= b["worker_cores"] <= (os.cpu_count() or 1) * 1.05
        assert "broker_cores" in b
        assert b["inference_s"] > 0 and 0 < b["tokenize_s"] < b["inference_s"]
        assert b["padded_tokens"] >= report["setup"]["tokens"] and b["raw_padded_tokens"] > 0
    assert "cores used: worker" in stdout
    _check_targets(report, rows, [
        "pipeline fp32 >= 1.0x peer, cosine >= 0.9999",
        "pipeline fp32 >= 0.9x raw ORT fp32", "pipeline int8 >= 0.9x raw ORT int8",
        "ORT int8 >= 1.5x peer, mean cosine >= 0.99, min >= 0.98",
        "pipeline fp32 p99 at half load <= max wait + 2 full batches",
        "pipeline int8 p99 at half load <= max wait + 2 full batches",
    ])


def _check_targets(report: dict[str, Any], rows: dict[str, Any], names: list[str]) -> None:
    """The targets named, each judged from its own figures: the raw-ORT ratio's verdict
    and figure agree with the rows (a smoke run is too short to expect targets met)."""
    targets = {t["target"]: t for t in report["targets"]}
    assert list(targets) == names
    assert all(isinstance(t["met"], bool) and t["figure"] for t in targets.values())
    ratio = rows["pipeline-fp32"]["items_per_s"] / rows["ort-fp32"]["items_per_s"]
    raw = targets["pipeline fp32 >= 0.9x raw ORT fp32"]
    assert abs(float(raw["figure"].rstrip("x")) - ratio) < 0.02, (raw, ratio)
    if abs(ratio - 0.9) > 0.02:
        assert raw["met"] == (ratio >= 0.9), (raw, ratio)


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


@pytest.mark.slow
@pytest.mark.parametrize(("modality", "model", "count_key"), [
    ("image", "efficientnet-lite0", "images"),
    ("audio", "aisfx", "clips"),
])
def test_bench_smoke_media(modality: str, model: str, count_key: str, media_model_root: Path,
                           tmp_path: Path) -> None:
    models = tmp_path / "models"  # the session's export, not one of its own
    shutil.copytree(media_model_root / model, models / model)
    stdout, report = _bench(models, tmp_path, "--modality", modality)
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
    _check_targets(report, rows, [
        "pipeline fp32 >= 1.0x peer, cosine >= 0.9999", "pipeline fp32 >= 0.9x raw ORT fp32",
        "pipeline fp32 p99 at half load <= max wait + 2 full batches",
    ])


def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def test_a_terminated_bench_stops_its_worker_and_stack(model_root: Path, tmp_path: Path) -> None:
    """SIGTERM mid-run (a CI timeout, kill): nothing the bench started outlives it."""
    import signal
    import time

    models = tmp_path / "models"
    shutil.copytree(model_root / MODEL, models / MODEL)
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedstream", "--log-level", "WARNING", "bench", "--texts", "200",
         "--rows", "pipeline-fp32", "--rounds", "1", "--latency-s", "120",
         "--model-dir", str(models)], cwd=tmp_path, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while len(started := _children(proc.pid)) < 3:  # broker, Redis and the worker
            assert proc.poll() is None and time.monotonic() < deadline, "bench did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        gone = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in started) and time.monotonic() < gone:
            time.sleep(0.2)
        left = [pid for pid in started if Path(f"/proc/{pid}").exists()
                and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]]
        assert left == []
    finally:
        if proc.poll() is None:
            proc.kill()


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
