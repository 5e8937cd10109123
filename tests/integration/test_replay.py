"""Re-driving dead letters after a fix, and re-embedding a range with a new model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from e2e_support import ThreadWorker, make_settings, stored_ids, wait_for

from embedstream.models.manifest import MANIFEST_FILE
from embedstream.producer import Producer
from embedstream.sinks.redis import connect, result_key

MODEL = "all-minilm-l6-v2"
NEW = "minilm-v2"


def add_model_version(root, name: str) -> None:
    """A second model directory (same graph, new name): the 'fix' we deploy."""
    shutil.copytree(root / MODEL, root / name)
    manifest = json.loads((root / name / MANIFEST_FILE).read_text())
    manifest["name"] = name
    (root / name / MANIFEST_FILE).write_text(json.dumps(manifest))


def run_cli(settings, *args: str) -> str:
    env = {**os.environ, "EMBEDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "EMBEDSTREAM_TOPIC_DLQ": settings.topic_dlq, "EMBEDSTREAM_GROUP_ID": settings.group_id,
           "EMBEDSTREAM_SESSION_TIMEOUT_MS": "6000", "EMBEDSTREAM_HEARTBEAT_INTERVAL_MS": "1000"}
    result = subprocess.run([sys.executable, "-m", "embedstream", *args], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_redrive_after_fix_and_reembed_with_new_model(stack, unique, model_root, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(model_root, root)
    settings = make_settings(stack, unique, root, models=[MODEL])
    worker = ThreadWorker(settings)
    try:
        with Producer(settings.kafka) as producer:
            for i in range(5):
                producer.send_text(f"plain event {i}", id=f"p{i}")
            for i in range(3):
                producer.send_text(f"for the new model {i}", id=f"n{i}", model=NEW)
            producer.send_raw(settings.topic_text, "junk", b"not json")
            producer.flush()
        client = connect(settings.redis)
        assert wait_for(lambda: worker.value("embedstream_events_failed_total",
                                             reason="unknown_model") == 3
                        and len(stored_ids(client, unique)) == 5)
    finally:
        assert worker.stop() == 0

    # The fix: deploy the missing model, restart the pool, re-drive unknown_model letters.
    add_model_version(root, NEW)
    settings = settings.model_copy(update={"models": [MODEL, NEW]})
    worker = ThreadWorker(settings)
    try:
        out = run_cli(settings, "replay", "dlq", "--reason", "unknown_model")
        assert "re-drove 3 dead letters" in out and "1 skipped" in out
        new_keys = lambda: {k.decode() for k in client.scan_iter(result_key(unique, NEW, "*"))}  # noqa: E731
        assert wait_for(lambda: len(new_keys()) == 3)
        # Running it again re-drives nothing: the reason's progress is remembered ...
        assert "re-drove 0 dead letters" in run_cli(settings, "replay", "dlq", "--reason",
                                                     "unknown_model")
        # ... and the letter it skipped is still there for a run over every reason.
        out = run_cli(settings, "replay", "dlq")
        assert "re-drove 1 dead letters" in out and "(invalid_json: 1)" in out
        assert "3 re-driven before" in out
        assert wait_for(lambda: worker.value("embedstream_events_failed_total",
                                             reason="invalid_json") == 1)  # fails again, once

        # Re-embed offsets 0..4 of partition 0 with the new model: new keys, old untouched.
        before = client.hget(result_key(unique, MODEL, "p0"), "version")
        out = run_cli(settings, "replay", "topic", settings.topic_text, "--model", NEW,
                      "--from-offset", "0")
        assert "re-published" in out
        assert wait_for(lambda: {f"{unique}:{NEW}:p{i}" for i in range(5)} <= new_keys())
        assert client.hget(result_key(unique, MODEL, "p0"), "version") == before
        # The re-embedding keeps the original version, not the replay's timestamp.
        assert client.hget(result_key(unique, NEW, "p0"), "version") == before
    finally:
        assert worker.stop() == 0
