"""Generative poison: whatever producers publish, every record ends stored or dead-lettered.

A seeded generator (``tests/support/poison.py``) makes records of every shape
for the text, image and audio topics, raw and enveloped: arbitrary bytes and
JSON, deep nesting, huge and tiny numbers, odd and invalid Unicode, duplicate
keys, very many and very large fields, wrong types in every field, broken and
plain media, forbidden URIs, odd headers and keys. They go through the real
broker to a real worker process (each Kafka client in turn) and real Redis.
The test asserts that every record's position ends in Redis (its ``source``)
or in the dead-letter topic with a known reason, that the worker never
exits, and that a good event published after them is stored in bounded time.

``make test`` runs 600 records per client; ``pytest --poison-records 20000
--poison-seed N`` runs a long one.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
from e2e_support import make_settings
from kafka import KafkaConsumer, KafkaProducer

from embedstream.envelope import REASONS
from embedstream.sinks.redis import connect
from support.poison import MODALITIES, PoisonGenerator
from support.stack import WorkerProcess, wait_for

MODELS = {"text": ["all-minilm-l6-v2", "spacy-en-md"], "image": ["efficientnet-lite0"],
          "audio": ["aisfx"]}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("client", ["kafka-python", "confluent"])
def test_no_record_a_producer_can_publish_stops_or_wedges_the_worker(
        stack, unique, media_model_root, tmp_path, client, poison_run):
    records, seed = poison_run
    settings = make_settings(
        stack, unique, media_model_root, topic_image=f"{unique}.image",
        topic_audio=f"{unique}.audio", kafka_client=client,
        models=[m for names in MODELS.values() for m in names],
        image_max_pixels=4_000_000, audio_max_seconds=30.0, batch_max_items=16,
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    generator = PoisonGenerator(seed, MODELS)
    try:
        assert wait_for(worker.ready, 120), worker.log.read_text()[-3000:]
        made, positions = _publish(settings, generator, records)

        store = connect(settings.redis)
        sentinels = {m: f"sentinel-{m}-{seed}" for m in MODALITIES}
        published_at = time.monotonic()
        _publish_good(settings, generator, sentinels, positions)
        assert wait_for(lambda: all(_stored(store, unique, m, sid)
                                    for m, sid in sentinels.items()), 180), \
            "a good event after the poison was not stored"
        good_after_s = time.monotonic() - published_at

        outcomes = _Outcomes(settings, store, unique)
        assert wait_for(lambda: outcomes.refresh() >= set(positions), 180), \
            _missing(positions, outcomes, made)
        assert worker.alive(), "the worker process exited"
        assert worker.get("/healthz")[0] == 200
        assert set(outcomes.reasons.values()) <= set(REASONS)
        assert outcomes.stored & set(outcomes.reasons) == set()  # one outcome per record
        kinds = Counter(m.kind for m in made)
        print(f"\npoison ({client}, seed {seed}): {len(made)} records, kinds {dict(kinds)}; "
              f"stored {len(outcomes.stored & set(positions))}, dead-lettered "
              f"{len(set(outcomes.reasons) & set(positions))} "
              f"({dict(Counter(outcomes.reasons.values()))}); good event stored "
              f"{good_after_s:.1f}s after publishing; examples: {outcomes.details}")
    finally:
        worker.stop()


def _publish(settings, generator: PoisonGenerator, count: int):
    topics = {m: settings.topic_for(m) for m in MODALITIES}
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                             max_request_size=8 << 20, linger_ms=5)
    made = [generator.make() for _ in range(count)]
    futures = [producer.send(topics[m.modality], key=m.key, value=m.value, headers=m.headers)
               for m in made]
    producer.flush()
    positions = {}
    for m, future in zip(made, futures, strict=True):
        meta = future.get(timeout=30)
        positions[(meta.topic, meta.partition, meta.offset)] = m
    producer.close()
    return made, positions


def _publish_good(settings, generator: PoisonGenerator, ids: dict[str, str], positions) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, max_request_size=8 << 20)
    for modality, event_id in ids.items():
        m = generator.good(modality, event_id)
        meta = producer.send(settings.topic_for(modality), key=m.key, value=m.value).get(30)
        positions[(meta.topic, meta.partition, meta.offset)] = m
    producer.close()


def _stored(store, prefix: str, modality: str, event_id: str) -> bool:
    return any(store.exists(f"{prefix}:{model}:{event_id}") for model in MODELS[modality])


class _Outcomes:
    """Positions stored (a result's ``source``) and dead-lettered (with their reason)."""

    def __init__(self, settings, store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.stored: set[tuple[str, int, int]] = set()
        self.reasons: dict[tuple[str, int, int], str] = {}
        self.details: dict[str, str] = {}  # one example detail per reason
        self._letters = KafkaConsumer(settings.topic_dlq, bootstrap_servers=settings.kafka_bootstrap,
                                      auto_offset_reset="earliest", enable_auto_commit=False,
                                      group_id=None, max_partition_fetch_bytes=8 << 20)

    def refresh(self) -> set[tuple[str, int, int]]:
        for records in self._letters.poll(timeout_ms=200).values():
            for letter in records:
                headers = dict(letter.headers)
                position = (headers["embedstream.source.topic"].decode(),
                            int(headers["embedstream.source.partition"]),
                            int(headers["embedstream.source.offset"]))
                self.reasons[position] = headers["embedstream.reason"].decode()
                self.details.setdefault(self.reasons[position],
                                        headers["embedstream.error"].decode()[:160])
        keys = [k for k in self.store.scan_iter(f"{self.prefix}:*", count=5000)
                if b":!" not in k]
        pipe = self.store.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "source")
        for source in pipe.execute():
            if source:
                topic, partition, offset = source.decode().rsplit(":", 2)
                self.stored.add((topic, int(partition), int(offset)))
        return self.stored | set(self.reasons)


def _missing(positions, outcomes: _Outcomes, made) -> str:
    missing = [p for p in positions if p not in outcomes.stored and p not in outcomes.reasons]
    sample = [(p, positions[p].kind, (positions[p].value or b"")[:120]) for p in missing[:5]]
    return f"{len(missing)} records neither stored nor dead-lettered, e.g. {sample}"
