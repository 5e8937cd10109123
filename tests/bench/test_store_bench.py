"""``embedstream bench --store --smoke``: the store bench runs end to end and its figures are
sane. Its rates are not checked here (a tiny run on a shared machine is noise); that every
vector was written, indexed and graded, and that the pipeline and shard rows ran, is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embedstream.bench.inputs import generated_texts

MODEL = "all-minilm-l6-v2"


@pytest.mark.slow
def test_store_bench_smoke(model_root: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(model_root / MODEL, models / MODEL)
    out = tmp_path / "store.json"
    seeds = tmp_path / "seeds.txt"  # the user's own texts seed the vectors
    seeds.write_text("\n".join(generated_texts(40, seed=3)) + "\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "embedstream", "--log-level", "WARNING", "bench", "--store",
         "--smoke", "--store-configs", "today,default,none", "--file", str(seeds),
         "--store-shards", "2",
         "--model-dir", str(models), "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recall@10" in proc.stdout and "by EF_RUNTIME" in proc.stdout

    report = json.loads(out.read_text())
    setup = report["setup"]
    assert setup["vectors"] == 3000 and setup["dim"] == 384 and setup["steps"] == [1000, 3000]
    assert setup["seed_source"] == str(seeds) and setup["seed_texts"] == 40
    assert setup["search_module"] and setup["mean_cosine_to_seed"] > 0.5
    assert setup["top10_variance_share"]["vectors"] > 0.15  # shaped like embeddings, not noise
    rows = report["rows"]
    assert {(r["config"], r["vectors"]) for r in rows} == {
        (c, n) for c in ("today", "default", "none") for n in (1000, 3000)}
    for r in rows:
        assert r["writes_per_s"] > 0 and r["bytes_per_vector"] > 384 * 4
        if r["config"] == "none":
            assert r["recall_at_10"] is None and r["index_bytes_per_vector"] is None
            continue
        # An index holds a copy of every vector beside the hash's.
        assert r["index_bytes_per_vector"] >= 384 * 4
        assert 0.5 <= r["recall_at_10"] <= 1.0 and r["query_p50_ms"] > 0
        assert sorted(r["recall_by_ef"]) == ["10", "100", "20", "200", "50"]
        assert r["recall_by_ef"]["200"][0] >= r["recall_by_ef"]["10"][0] - 0.02
    today = [r for r in rows if r["config"] == "today"]
    assert all(r["vs_today"] == 1.0 for r in today)

    (combined,) = report["combined"]
    assert combined["config"] == "default" and combined["store_vectors"] == 3000
    assert combined["pipeline_items_per_s"] > 0 and combined["limit"] in ("model", "store")
    # The same vectors through one sink into one server, then a 2-master cluster.
    one, two = report["shards"]
    assert (one["shards"], two["shards"]) == (1, 2) and one["vs_one"] == 1.0
    assert one["vectors"] == two["vectors"] == 3000 and two["writes_per_s"] > 0
    assert "2 shards (default, 3,000 vectors" in proc.stdout
    (target,) = report["targets"]
    assert not target["met"] and "the target is at 1,000,000" in target["target"]
