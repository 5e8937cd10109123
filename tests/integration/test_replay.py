"""Re-driving dead letters after a fix, and re-embedding a range with a new model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from e2e_support import ThreadWorker, make_settings, stored_ids, wait_for
from kafka import KafkaProducer

from embedstream.envelope import RawRecord, encode
from embedstream.errors import SourceError
from embedstream.models.manifest import MANIFEST_FILE
from embedstream.producer import Producer
from embedstream.replay import redrive_dead_letters, reembed_range
from embedstream.rollout.lifecycle import _offsets
from embedstream.settings import Settings
from embedstream.sinks.redis import connect, result_key
from embedstream.sources.base import TopicPartition
from embedstream.sources.registry import kafka_client

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


def read_from(settings: Settings, starts: dict[TopicPartition, int], expected: int) -> list[RawRecord]:
    reader = kafka_client(settings.kafka_client).reader(settings.kafka, max_record_bytes=8 << 20)
    got: list[RawRecord] = []
    try:
        reader.read_from(starts)
        assert wait_for(lambda: got.extend(reader.poll(0.2)) or len(got) >= expected, 30), got
    finally:
        reader.close()
    return got


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_replay_reads_and_writes_through_the_client_the_settings_name(stack, unique, client):
    """``replay`` and a rollout's bounds use ``kafka_client`` for every read, commit and
    write. Dead letters written by that client's dead-letter producer (one a reference
    to a record too large to copy) are re-driven once, with their own headers, the
    progress of a reason's run kept in its group; a
    dry run writes nothing; a range is re-published for another model; a partition
    or topic that does not exist is a clear error."""
    settings = Settings(kafka_bootstrap=stack.bootstrap, kafka_client=client,
                        topic_text=f"{unique}.text", topic_dlq=f"{unique}.dlq",
                        group_id=f"{unique}-group", topic_partitions=2)
    topic = settings.topic_text
    kit = kafka_client(client)
    kit.ensure_topics(settings.kafka, [topic, settings.topic_dlq])
    huge = encode("huge", text="x" * 3_000_000)  # over the dead-letter producer's 1 MB
    events = [encode(f"e{i}", text=f"event {i}") for i in range(3)]
    raw = KafkaProducer(bootstrap_servers=stack.bootstrap, max_request_size=8 << 20)
    raw.send(topic, key=b"huge", value=huge, partition=0, timestamp_ms=1_000)
    for i, value in enumerate(events):  # one record a batch: Tansu's end offsets are right then
        raw.send(topic, key=f"e{i}".encode(), value=value, partition=1, timestamp_ms=2_000 + i,
                 headers=[("x-trace", b"t0")] if i == 0 else None)
        raw.flush()
    raw.close()

    letters = kit.dead_letters(settings.kafka)
    written: list[str] = []
    letters.send(RawRecord(topic, 0, 0, b"huge", huge, 1_000), "payload_too_large", "too big",
                 lambda: written.append("huge"), lambda err: written.append(repr(err)))
    letters.send(RawRecord(topic, 1, 0, b"e0", events[0], 2_000, (("x-trace", b"t0"),)),
                 "unknown_model", "no such model", lambda: written.append("e0"),
                 lambda err: written.append(repr(err)))
    letters.flush(30)
    letters.close()
    assert sorted(written) == ["e0", "huge"]

    before = ends_of(settings, topic)
    dry = redrive_dead_letters(settings.kafka, dry_run=True)
    assert (dry.published, dict(dry.by_reason)) == (0, {"payload_too_large": 1, "unknown_model": 1})
    firsts, ends = _offsets(settings, [topic])  # the rollout's bounds, through the same client
    assert (firsts, ends) == ({f"{topic}:0": 0, f"{topic}:1": 0},
                              {f"{topic}:{p}": end for (_t, p), end in before.items()})
    assert before == {(topic, 0): 1, (topic, 1): 3}

    first = redrive_dead_letters(settings.kafka, reasons={"unknown_model"})
    assert (first.published, first.skipped) == (1, 1)
    rest = redrive_dead_letters(settings.kafka)  # its progress per reason is the group's
    assert (rest.published, rest.already, rest.unrecoverable) == (1, 1, 0)
    redriven = {r.key: r for r in read_from(settings, before, 2)}
    assert redriven[b"huge"].value == huge  # read back from its source position
    assert redriven[b"e0"].value == events[0]
    assert ("x-trace", b"t0") in redriven[b"e0"].headers
    assert dict(redriven[b"e0"].headers)["embedstream.redriven_from"].startswith(
        f"{settings.topic_dlq}:".encode())
    again = redrive_dead_letters(settings.kafka)
    assert (again.published, again.already, again.skipped) == (0, 0, 0)  # started past both

    after = ends_of(settings, topic)
    out = reembed_range(settings.kafka, topic, "m2", partitions=[1], start=1, end=3)
    assert (out.published, out.skipped) == (2, 0)
    bodies = sorted((json.loads(r.value) for r in read_from(settings, after, 2)),
                    key=lambda b: b["id"])
    assert [(b["id"], b["model"], b["version"]) for b in bodies] == [
        ("e1", "m2", 2_001), ("e2", "m2", 2_002)]  # the originals' versions, not the replay's
    with pytest.raises(SourceError, match="no partition 7"):
        reembed_range(settings.kafka, topic, "m2", partitions=[7])
    with pytest.raises(SourceError, match="does not exist"):
        reembed_range(settings.kafka, f"{unique}.absent", "m2")


def ends_of(settings: Settings, topic: str) -> dict[TopicPartition, int]:
    reader = kafka_client(settings.kafka_client).reader(settings.kafka)
    try:
        return {tp: end for tp, (_first, end) in reader.bounds([(topic, 0), (topic, 1)]).items()}
    finally:
        reader.close()
