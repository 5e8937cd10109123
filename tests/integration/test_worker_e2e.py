"""The text pipeline end to end on the real embedded broker and Redis.

Real worker (in a thread, or as real processes), real ONNX model, real
Kafka clients; each test has its own topics, group and key prefix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from e2e_support import (
    MODEL,
    ThreadWorker,
    dead_letters,
    make_settings,
    partition_ends,
    stored_ids,
    wait_for,
    worker_env_vars,
)
from kafka import KafkaConsumer

from embedstream.envelope import encode
from embedstream.producer import Producer
from embedstream.runtime.loader import load_models
from embedstream.search import search_vector
from embedstream.settings import Settings
from embedstream.sinks.redis import connect, index_name, result_key


@pytest.mark.parametrize("kafka_client", ["kafka-python", "confluent"])
def test_events_flow_from_kafka_to_searchable_redis(stack, unique, model_root, kafka_client):
    settings = make_settings(stack, unique, model_root, batch_max_items=16, kafka_client=kafka_client)
    texts = [f"Sentence number {i} about {topic}." for i, topic in
             enumerate(["rockets", "cooking", "football", "music"] * 30)]
    texts.append("word " * 400)  # over the 256-token limit: two chunks
    worker = ThreadWorker(settings)
    try:
        with Producer(settings.kafka) as producer:
            ids = [producer.send_text(t, metadata={"n": i, "lang": "en"}) for i, t in enumerate(texts)]
            producer.send_raw(settings.topic_text, "bad-json", b"{oops")
            producer.send_raw(settings.topic_text, "bad-utf8", b"\xff\xfe")
            producer.send_raw(settings.topic_text, None, b'{"id": "no-text"}')
            producer.send_raw(settings.topic_text, None, b'{"id": "empty", "text": ""}')
            producer.send_raw(settings.topic_text, None,
                              b'{"id": "unknown", "text": "x", "model": "nope"}')
            producer.flush()
        client = connect(settings.redis)
        assert wait_for(lambda: len(stored_ids(client, unique)) >= len(texts)
                        and worker.value("embedstream_events_failed_total",
                                         reason="unknown_model") == 1)
        assert stored_ids(client, unique) == set(ids)

        # Stored vectors are exactly the model's embeddings of the texts.
        model = load_models(model_root, [MODEL], providers=[], threads=1)[MODEL]
        for i in (0, 7, len(texts) - 1):
            fields = client.hgetall(result_key(unique, MODEL, ids[i]))
            vector = np.frombuffer(fields[b"embedding"], dtype="<f4")
            assert vector.shape == (384,)
            expected = model.embed_texts([texts[i]])[0]
            assert float(vector @ expected) > 0.9999
            assert fields[b"model"] == MODEL.encode() and fields[b"dim"] == b"384"
            assert fields[b"modality"] == b"text" and fields[b"meta_lang"] == b"en"
            assert fields[b"meta_n"] == str(i).encode()
            assert json.loads(fields[b"metadata"]) == {"n": i, "lang": "en"}  # as sent
            assert float(fields[b"created_at"]) > time.time() - 600

        # The index exists with the model's dimension, and KNN finds the right topic.
        assert client.ft(index_name(unique, MODEL)).info()
        hits = search_vector(client, unique, MODEL, model.embed_texts(["rocket launch"])[0], 3)
        assert all("rockets" in h.fields["text"] for h in hits)
        assert hits[0].score > hits[-1].score - 1e-6

        # Bad events are in the dead-letter topic with their reasons; nothing else is.
        letters = dead_letters(settings, 5)
        reasons = {dict(r.headers)["embedstream.reason"].decode() for r in letters}
        assert reasons == {"invalid_json", "invalid_utf8", "missing_text", "empty_text",
                           "unknown_model"}
        bad_json = next(r for r in letters if r.key == b"bad-json")
        assert bad_json.value == b"{oops"
        headers = dict(bad_json.headers)
        assert headers["embedstream.source.topic"] == settings.topic_text.encode()
        assert int(headers["embedstream.source.offset"]) >= 0

        assert worker.value("embedstream_events_embedded_total", model=MODEL) == len(texts)
        assert worker.value("embedstream_events_truncated_total", model=MODEL) == 0
        assert worker.value("embedstream_chunks_stored_total", model=MODEL) == 2
        second = client.hgetall(result_key(unique, MODEL, ids[-1], 1))
        assert second[b"id"] == ids[-1].encode() and second[b"chunks"] == b"2"
        assert texts[-1][int(second[b"start"]):int(second[b"end"])] == second[b"text"].decode()
        assert worker.value("embedstream_batch_size_count", model=MODEL) >= len(texts) / 16
    finally:
        assert worker.stop() == 0

    # Everything consumed was committed before the worker left the group.
    assert_all_committed(settings, len(texts) + 5)


def assert_all_committed(settings: Settings, records: int) -> None:
    """The group's committed offsets are the ends of every partition, which hold ``records``."""
    ends = partition_ends(settings.kafka_bootstrap, settings.topic_text, 4)
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                             group_id=settings.group_id, enable_auto_commit=False)
    committed = {tp: consumer.committed(tp) or 0 for tp in ends}
    consumer.close()
    assert committed == ends
    assert sum(ends.values()) == records


def test_librdkafka_client_event_reaches_redis(stack, unique, model_root):
    confluent_kafka = pytest.importorskip("confluent_kafka")
    settings = make_settings(stack, unique, model_root)
    worker = ThreadWorker(settings)
    try:
        producer = confluent_kafka.Producer({"bootstrap.servers": stack.bootstrap})
        producer.produce(settings.topic_text, key=b"from-librdkafka",
                         value=json.dumps({"text": "produced by librdkafka"}).encode())
        assert producer.flush(15) == 0
        client = connect(settings.redis)
        assert wait_for(lambda: "from-librdkafka" in stored_ids(client, unique))
        text = client.hget(result_key(unique, MODEL, "from-librdkafka"), "text")
        assert text == b"produced by librdkafka"
    finally:
        assert worker.stop() == 0


def test_confluent_workers_split_partitions_and_one_leaves_without_loss(stack, unique, model_root):
    """Two workers on confluent-kafka share the group; one drains and leaves mid-stream.

    Nothing is lost, nothing is stored twice as new (a redelivered event is a
    recognised duplicate), and every offset is committed once both have left.
    """
    settings = make_settings(stack, unique, model_root, kafka_client="confluent",
                             batch_max_wait_ms=5, intra_op_threads=1, publish_results=True,
                             topic_results=f"{unique}.results")
    client = connect(settings.redis)
    sent: list[str] = []
    workers = [ThreadWorker(settings), ThreadWorker(settings)]
    leaving = workers[1]

    def consumed(worker: ThreadWorker) -> float:
        return worker.value("embedstream_events_consumed_total", topic=settings.topic_text)

    def embedded(name: str) -> float:
        return sum(w.value(name, model=MODEL) for w in workers)

    try:
        with Producer(settings.kafka) as producer:
            def wave(count: int) -> None:
                start = len(sent)
                sent.extend(producer.send_text(f"event {i} of the stream", id=f"e{i}")
                            for i in range(start, start + count))
                producer.flush()

            # Small waves until the group has settled with a share for each worker.
            deadline = time.monotonic() + 60
            while not all(consumed(w) > 0 for w in workers):
                assert time.monotonic() < deadline, [consumed(w) for w in workers]
                wave(8)
                time.sleep(0.5)
            wave(100)
            assert leaving.stop() == 0  # drains what it holds, commits it, leaves
            wave(50)
        assert wait_for(lambda: len(stored_ids(client, unique)) >= len(sent), timeout=90)
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0]
    assert stored_ids(client, unique) == set(sent)
    assert embedded("embedstream_events_embedded_total") == len(sent)  # each stored once
    # The staying worker's revoke forgets what it had in flight: only those come again.
    assert embedded("embedstream_events_duplicate_total") <= 100
    assert_all_committed(settings, len(sent))
    # The results stream went through librdkafka too (the client registry's sender).
    results = KafkaConsumer(settings.topic_results, bootstrap_servers=settings.kafka_bootstrap,
                            auto_offset_reset="earliest", group_id=None, consumer_timeout_ms=5000)
    announced = {json.loads(r.value)["id"] for r in results}
    results.close()
    assert announced == set(sent)


def _cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "embedstream", *args], text=True,
                            env={**os.environ, **(env or {})}, **kw)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _sample(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def test_worker_processes_share_partitions_and_drain_on_sigterm(stack, unique, model_root,
                                                                 tmp_path):
    from embedstream.devstack import free_port

    settings = make_settings(stack, unique, model_root)
    port = free_port()
    pool = _cli("worker", "--processes", "2", "--metrics-port", str(port),
                "--metrics-host", "127.0.0.1", env=worker_env_vars(settings))
    try:
        lines = tmp_path / "events.txt"
        lines.write_text("".join(f"pool event {i}\n" for i in range(200))
                         + '{"id": "jsonl-1", "text": "a JSONL envelope"}\n')
        produce = subprocess.run(
            [sys.executable, "-m", "embedstream", "produce", "text", str(lines), "--no-progress"],
            env={**os.environ, **worker_env_vars(settings)}, capture_output=True, text=True, timeout=120,
        )
        assert produce.returncode == 0, produce.stderr
        assert "sent 201 events" in produce.stdout
        client = connect(settings.redis)
        assert wait_for(lambda: len(stored_ids(client, unique)) == 201, timeout=120)
        assert "jsonl-1" in stored_ids(client, unique)

        # Both processes joined the group and each consumed a share.
        consumed = [_sample(_scrape(port + i), "embedstream_events_consumed_total")
                    for i in range(2)]
        assert sum(consumed) == 201 and all(c > 0 for c in consumed), consumed
        assert "embedstream_stage_seconds_bucket" in _scrape(port)
        for i in range(2):  # a healthy worker is ready: models, consumer, broker, Redis
            with urllib.request.urlopen(f"http://127.0.0.1:{port + i}/readyz", timeout=5) as r:
                assert r.status == 200 and json.loads(r.read())["ready"] is True

        started = time.monotonic()
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(timeout=60) == 0
        assert time.monotonic() - started < 40
    finally:
        if pool.poll() is None:
            pool.kill()


def test_search_command_prints_nearest(stack, unique, model_root):
    settings = make_settings(stack, unique, model_root)
    worker = ThreadWorker(settings)
    try:
        with Producer(settings.kafka) as producer:
            producer.send_text("The cat sleeps on the warm windowsill.", id="cat")
            producer.send_text("Interest rates rose again this quarter.", id="rates")
            producer.flush()
        client = connect(settings.redis)
        assert wait_for(lambda: stored_ids(client, unique) == {"cat", "rates"})
    finally:
        worker.stop()
    result = subprocess.run(
        [sys.executable, "-m", "embedstream", "search", "a kitten napping", "-k", "2", "--json"],
        env={**os.environ, **worker_env_vars(settings)}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert [h["id"] for h in hits] == ["cat", "rates"]
    assert hits[0]["score"] > hits[1]["score"]


def test_worker_runtime_imports_neither_torch_nor_transformers(stack, unique, model_root):
    settings = make_settings(stack, unique, model_root)
    code = f"""
import sys
from embedstream.settings import Settings
from embedstream.worker.service import build_worker
import embedstream.cli.app
from embedstream.worker.service import build_worker
settings = Settings.model_validate_json({settings.model_dump_json()!r})
worker = build_worker(settings)
worker.stop()
worker.run()
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers',
               'sentence_transformers'))
print('HEAVY', heavy)
sys.exit(1 if heavy else 0)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 0


def test_bad_configuration_fails_with_a_clear_message(stack, unique, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "embedstream", "worker", "--model-dir", str(tmp_path)],
        env={**os.environ, "EMBEDSTREAM_KAFKA_BOOTSTRAP": stack.bootstrap},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "no models under" in result.stderr and "embedstream export" in result.stderr


def test_an_older_version_never_overwrites_a_newer_one(stack, unique, model_root):
    settings = make_settings(stack, unique, model_root)
    worker = ThreadWorker(settings)
    try:
        client = connect(settings.redis)
        key = result_key(unique, MODEL, "doc")
        with Producer(settings.kafka) as producer:
            producer.send_raw(settings.topic_text, "doc", encode("doc", text="second", version=2))
            producer.flush()
            assert wait_for(lambda: client.hget(key, "text") == b"second")
            # A replay of version 1 (older) arrives later: it must not win. Version 2 sent
            # again ties with the stored one: the later offset wins, so it is stored again.
            producer.send_raw(settings.topic_text, "doc", encode("doc", text="first", version=1))
            producer.send_raw(settings.topic_text, "doc", encode("doc", text="again", version=2))
            producer.flush()
            assert wait_for(lambda: client.hget(key, "text") == b"again")
            producer.send_raw(settings.topic_text, "doc", encode("doc", text="third", version=3))
            producer.flush()
        assert wait_for(lambda: worker.value("embedstream_events_stale_total", model=MODEL) == 1
                    and client.hget(key, "text") == b"third")
        assert client.hget(key, "version") == b"3"
    finally:
        assert worker.stop() == 0
