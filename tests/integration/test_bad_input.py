"""Each way one record used to stop or wedge the pool, on the real broker, worker and Redis.

A data error in the store for one item, metadata past the script's old limits,
equal versions, a full Redis, a record too large for the dead-letter producer,
a record that kills the process holding it, and a stage wedged on a fetch
that never returns: each is contained to its record (or reported as the
world's failure), and the next good event is stored.
"""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from e2e_support import MODEL, ThreadWorker, make_settings, stored_ids
from kafka import KafkaConsumer, KafkaProducer
from PIL import Image

from embedstream.envelope import RawRecord, encode
from embedstream.models.manifest import load_manifest
from embedstream.settings import Settings
from embedstream.sinks.base import Embedded
from embedstream.sinks.redis import RedisSink, connect, result_key
from embedstream.worker.quarantine import Mark, RedisCrashLedger
from support.stack import RedisServer, WorkerProcess, hanging_files, wait_for

IMAGE_MODEL = "efficientnet-lite0"


def letters(settings: Settings, expected: int, timeout: float = 60) -> list:
    consumer = KafkaConsumer(settings.topic_dlq, bootstrap_servers=settings.kafka_bootstrap,
                             auto_offset_reset="earliest", enable_auto_commit=False,
                             group_id=None, max_partition_fetch_bytes=8 << 20)
    out: list = []
    deadline = time.monotonic() + timeout
    while len(out) < expected and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            out.extend(records)
    consumer.close()
    return out


def reason_of(letter) -> str:
    return dict(letter.headers)["embedstream.reason"].decode()


def produce(settings: Settings, topic: str, records: list[tuple[bytes | None, bytes]],
            partition: int | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                             max_request_size=8 << 20)
    for key, value in records:
        producer.send(topic, key=key, value=value, partition=partition)
    producer.flush()
    producer.close()


def png(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_store_data_error_dead_letters_that_item_and_stores_the_rest(stack, unique, model_root):
    settings = make_settings(stack, unique, model_root)
    client = connect(settings.redis)
    client.set(result_key(unique, MODEL, "wrongtype"), "a string where a hash goes")
    worker = ThreadWorker(settings)
    try:
        produce(settings, settings.topic_text, [
            (f"ok-{i}".encode(), encode(f"ok-{i}", text=f"good text {i}")) for i in range(4)
        ] + [(b"wrongtype", encode("wrongtype", text="its key holds a string"))], partition=0)
        assert wait_for(lambda: len(stored_ids(client, unique)) >= 5
                        and worker.value("embedstream_events_failed_total",
                                         reason="store_rejected") == 1)
        (letter,) = letters(settings, 1)
        assert reason_of(letter) == "store_rejected" and letter.key == b"wrongtype"
        assert b"WRONGTYPE" in dict(letter.headers)["embedstream.error"]
        assert {f"ok-{i}" for i in range(4)} <= stored_ids(client, unique)
        assert worker.value("embedstream_sink_retries_total") == 0  # never retried as an outage
    finally:
        assert worker.stop() == 0


def test_metadata_the_old_write_script_could_not_unpack_is_stored_when_allowed(
        stack, unique, model_root):
    """3,000 metadata fields made the Lua script fail (too many results to unpack) and the
    sink retry forever; the default limits now reject such an event at decode time, and
    a deployment that raises them gets it stored."""
    settings = make_settings(stack, unique, model_root, metadata_max_fields=5000,
                             metadata_max_bytes=1 << 20)
    client = connect(settings.redis)
    worker = ThreadWorker(settings)
    try:
        fields = {f"f{i}": i for i in range(3000)}
        produce(settings, settings.topic_text, [
            (b"wide", encode("wide", text="an event with many fields", metadata=fields)),
            (b"after", encode("after", text="the next event")),
        ])
        key = result_key(unique, MODEL, "wide")
        assert wait_for(lambda: client.hlen(key) > 3000 and "after" in stored_ids(client, unique))
        assert client.hget(key, "meta_f2999") == b"2999"
    finally:
        assert worker.stop() == 0
    settings = settings.model_copy(update={"metadata_max_fields": 256, "group_id": unique + "-2",
                                           "key_prefix": unique + "-2"})
    worker = ThreadWorker(settings)
    try:
        assert wait_for(lambda: worker.value("embedstream_events_failed_total",
                                             reason="metadata_too_large") == 1)
    finally:
        assert worker.stop() == 0


def test_equal_versions_are_ordered_by_offset_in_the_write_script(stack, unique, model_root):
    settings = Settings(redis_url=stack.redis_url, key_prefix=unique, create_index=False)
    manifest = load_manifest(model_root / MODEL)
    sink = RedisSink(settings.redis)
    client = connect(settings.redis)

    def result(offset: int, partition: int, text: str, version: int = 7) -> Embedded:
        record = RawRecord("t.text", partition, offset, b"doc", b"", 1_000)
        event = _event(record, text, version)
        return Embedded(event, manifest, np.ones(manifest.dimension, np.float32))

    try:
        assert sink.write([result(9, 0, "later")]).stored == 1
        outcome = sink.write([result(5, 0, "earlier, written second")])
        assert (outcome.stored, outcome.stale) == (0, 1)
        mixed = sink.write([result(10, 0, "newest"), result(6, 0, "older again")])
        assert (mixed.stored, mixed.stale, mixed.stale_at) == (1, 1, (1,))  # which one: never announced
        assert sink.write([result(10, 0, "newest")]).duplicates == 1  # a redelivery
        assert sink.write([result(10, 1, "same offset, higher partition")]).stored == 1
        assert sink.write([result(1, 0, "newer version", version=8)]).stored == 1
        assert client.hget(result_key(unique, manifest.name, "doc"), "text") == b"newer version"
    finally:
        sink.close()
        client.close()


def _event(record: RawRecord, text: str, version: int):
    from embedstream.envelope import Event

    return Event("doc", "text", None, text, {}, record, version=version)


def test_a_full_redis_pauses_the_worker_reports_it_and_loses_nothing(
        stack, unique, model_root, tmp_path):
    server = RedisServer(tmp_path, "--maxmemory-policy", "noeviction")
    server.start()
    worker = None
    try:
        settings = make_settings(stack, unique, model_root, commit_interval_ms=100)
        settings = settings.model_copy(update={"redis_url": server.url})
        worker = ThreadWorker(settings)
        client = server.client()
        client.config_set("maxmemory", 1)  # full: every write is refused with OOM
        produce(settings, settings.topic_text,
                [(f"e{i}".encode(), encode(f"e{i}", text=f"event {i}")) for i in range(6)])
        assert wait_for(lambda: worker.value("embedstream_store_full_total") >= 2)
        checks = worker.worker.readiness()
        assert checks["redis_memory"] is False and worker.worker.healthy()
        group = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                              group_id=settings.group_id, enable_auto_commit=False)
        from kafka import TopicPartition

        parts = [TopicPartition(settings.topic_text, p) for p in range(4)]
        assert all(not group.committed(tp) for tp in parts)  # nothing committed meanwhile
        group.close()
        client.config_set("maxmemory", 0)  # an operator made room
        assert wait_for(lambda: len(stored_ids(client, unique)) == 6)
        assert wait_for(lambda: worker.worker.readiness()["redis_memory"])
        failed = sum(s.value for m in worker.metrics.registry.collect() for s in m.samples
                     if s.name == "embedstream_events_failed_total")
        assert failed == 0  # nothing was dead-lettered
    finally:
        if worker is not None:
            assert worker.stop() == 0
        server.kill()


def test_a_worker_started_while_redis_is_down_waits_for_it_and_then_works(
        stack, unique, model_root, tmp_path):
    """A worker process that starts before Redis does (a pod rescheduled mid-outage, a
    stack coming up) waits for it instead of exiting with the configuration-error code,
    which a pool does not restart. Once Redis is up the worker stores, and it stops with
    0."""
    server = RedisServer(tmp_path)  # its port is chosen; nothing listens there yet
    settings = make_settings(stack, unique, model_root).model_copy(
        update={"redis_url": server.url})
    log = tmp_path / "worker.log"
    worker = WorkerProcess(settings, log)
    try:
        waiting = lambda: log.read_text().count("does not answer yet") >= 2  # noqa: E731
        assert wait_for(lambda: waiting() or not worker.alive(), 60), log.read_text()
        assert worker.alive(), log.read_text()
        server.start()
        assert wait_for(worker.ready, 90), log.read_text()
        produce(settings, settings.topic_text,
                [(f"e{i}".encode(), encode(f"e{i}", text=f"event {i}")) for i in range(3)])
        assert wait_for(lambda: stored_ids(server.client(), unique) == {"e0", "e1", "e2"})
        assert worker.stop() == 0
    finally:
        worker.kill()
        server.kill()


@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_a_record_too_large_to_copy_is_dead_lettered_as_a_reference(
        stack, unique, model_root, client):
    settings = make_settings(stack, unique, model_root, kafka_client=client)
    store = connect(settings.redis)
    worker = ThreadWorker(settings)
    try:
        huge = encode("huge", text="x" * 3_000_000)  # the broker took it; 3x the producer limit
        produce(settings, settings.topic_text, [(b"huge", huge), (b"next", encode("next", text="ok"))],
                partition=0)
        assert wait_for(lambda: "next" in stored_ids(store, unique))
        (letter,) = letters(settings, 1)
        headers = dict(letter.headers)
        body = json.loads(letter.value)
        assert headers["embedstream.reason"] == b"payload_too_large"
        assert headers["embedstream.value"] == b"reference"
        assert (body["topic"], body["partition"], body["value_bytes"]) == (
            settings.topic_text, 0, len(huge))
        import hashlib

        assert body["value_sha256"] == hashlib.sha256(huge).hexdigest()
        assert worker.thread.is_alive() and worker.worker.healthy()
    finally:
        assert worker.stop() == 0


def test_crash_loop_marks_keep_every_field_in_redis(stack, unique):
    """The breaker's ledger on the real store: a mark reads back as written (the processes
    whose deaths it counts among it), a cleared one is gone, and explained deaths are kept."""
    ledger = RedisCrashLedger(connect(Settings(redis_url=stack.redis_url).redis), unique, "g")
    full = Mark(7, 2, isolating=9, owner="p3", handed_over=False, dead=("p1", "p2"), reach=300)
    ledger.write({("t", 0): full, ("t", 1): Mark(3, owner="p3")})
    assert ledger.read(("t", 0)) == full and ledger.read(("t", 1)) == Mark(3, owner="p3")
    ledger.write({("t", 1): Mark(4, 1, owner="p3", handed_over=True, dead=("p2",))})
    assert ledger.read(("t", 1)) == Mark(4, 1, owner="p3", handed_over=True, dead=("p2",))
    ledger.clear({("t", 0)})
    assert ledger.read(("t", 0)) is None
    ledger.explain("p1")
    assert ledger.explained("p1") and not ledger.explained("p2")


@pytest.mark.slow
def test_a_record_that_kills_its_worker_is_quarantined_after_two_deaths(
        stack, unique, media_model_root, tmp_path):
    """The record is an image whose claim-check fetch never answers; whenever a worker
    process is seen fetching it, the test SIGKILLs that process (what a segfault in a
    native decoder does) and starts another. The second death happens with the record
    processed alone, and the third process dead-letters it without fetching it."""
    with hanging_files() as files:
        settings = make_settings(
            stack, unique, media_model_root, topic_image=f"{unique}.image",
            models=[MODEL, IMAGE_MODEL], uri_allowed_hosts=["127.0.0.1"],
            uri_allow_private_networks=True, fetch_timeout_s=120, poison_max_deaths=2,
        )
        poison = json.dumps({"id": "killer", "uri": files.url("killer.png")}).encode()
        goods = [(f"img-{i}".encode(), json.dumps({"id": f"img-{i}", "data": png(i)}).encode())
                 for i in range(3)]
        workers: list[WorkerProcess] = []
        try:
            workers.append(WorkerProcess(settings, tmp_path / "w0.log"))
            assert wait_for(workers[0].ready, 90)
            produce(settings, settings.topic_image, [(b"killer", poison), *goods], partition=0)
            for death in range(2):
                assert files.hit.wait(60), f"no fetch before death {death + 1}"
                files.hit.clear()
                workers[-1].kill()
                workers.append(WorkerProcess(settings, tmp_path / f"w{death + 1}.log"))
            store = connect(settings.redis)
            ids = lambda: {k.decode().rsplit(":", 1)[-1]  # noqa: E731
                           for k in store.scan_iter(result_key(unique, IMAGE_MODEL, "*"))}
            assert wait_for(lambda: ids() == {"img-0", "img-1", "img-2"}, 120)
            (letter,) = letters(settings, 1)
            assert reason_of(letter) == "poison_quarantined" and letter.key == b"killer"
            assert files.hits == 2  # never fetched a third time
            assert workers[-1].alive() and workers[-1].metric("embedstream_crash_loop_careful") == 0
        finally:
            for worker in workers:
                worker.kill()


def test_liveness_fails_when_a_stage_is_wedged(stack, unique, media_model_root, tmp_path):
    """A claim-check fetch that never returns wedges the pre stage: /healthz turns 503
    and names it, so Kubernetes restarts the pod; /readyz keeps its own meaning."""
    with hanging_files() as files:
        settings = make_settings(
            stack, unique, media_model_root, topic_image=f"{unique}.image",
            models=[MODEL, IMAGE_MODEL], uri_allowed_hosts=["127.0.0.1"],
            uri_allow_private_networks=True, fetch_timeout_s=120, liveness_timeout_s=2,
        )
        worker = WorkerProcess(settings, tmp_path / "w.log")
        try:
            assert wait_for(worker.ready, 90)
            assert worker.get("/healthz")[0] == 200
            produce(settings, settings.topic_image,
                    [(b"slow", json.dumps({"id": "slow", "uri": files.url("slow.png")}).encode())])
            assert files.hit.wait(60)
            assert wait_for(lambda: worker.get("/healthz")[0] == 503, 30)
            body = json.loads(worker.get("/healthz")[1])
            assert "pre" in body["checks"]["stalled"]
        finally:
            worker.kill()
