"""Reprocessing: re-drive dead letters after a fix, re-embed a topic range.

``redrive_dead_letters`` reads the dead-letter topic as the consumer group
``<group_id>-redrive`` and publishes each letter's original key and value
back to its source topic (from the ``embedstream.source.topic`` header), so
a letter is re-driven once however often the command runs; offsets are
committed only after the re-published records are acknowledged.

``reembed_range`` reads a range of a topic and publishes each event again
with ``model`` set to the new model and ``version`` pinned to the original
record's version (its own ``version`` or timestamp), so a re-embedding never
looks newer than the data it came from.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from embedstream.errors import SourceError
from embedstream.settings import Settings
from embedstream.sources.kafka import client_config

log = logging.getLogger(__name__)

_IDLE_MS = 3000  # a read that brings nothing for this long has reached the end


@dataclass
class ReplayReport:
    published: int = 0
    skipped: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)


def redrive_dead_letters(
    settings: Settings, *, reasons: set[str] | None = None, dry_run: bool = False
) -> ReplayReport:
    """Publish dead letters (of ``reasons``, or all) back to their source topics."""
    consumer = KafkaConsumer(
        settings.topic_dlq,
        **client_config(settings),
        group_id=f"{settings.group_id}-redrive",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
    )
    producer = None if dry_run else _producer(settings)
    report = ReplayReport()
    positions: dict[TopicPartition, int] = {}
    try:
        for record in _read_until_idle(consumer):
            headers = dict(record.headers or ())
            reason = headers.get("embedstream.reason", b"").decode()
            source = headers.get("embedstream.source.topic", b"").decode()
            positions[TopicPartition(record.topic, record.partition)] = record.offset + 1
            if not source or (reasons and reason not in reasons):
                report.skipped += 1
                continue
            report.by_reason[reason] += 1
            if producer is not None:
                original = [(k, v) for k, v in record.headers or () if not k.startswith("embedstream.")]
                original.append(("embedstream.redriven_from",
                                  f"{record.topic}:{record.partition}:{record.offset}".encode()))
                producer.send(source, key=record.key, value=record.value, headers=original)
            report.published += 1
        if producer is not None:
            producer.flush()
            consumer.commit({tp: OffsetAndMetadata(o, "", -1) for tp, o in positions.items()})
    finally:
        consumer.close(autocommit=False)
        if producer is not None:
            producer.close()
    if dry_run:
        report.published = 0
    return report


def reembed_range(
    settings: Settings,
    topic: str,
    model: str,
    *,
    partitions: list[int] | None = None,
    start: int = 0,
    end: int | None = None,
) -> ReplayReport:
    """Re-publish records ``start <= offset < end`` of ``topic`` for ``model``.

    ``end`` defaults to the end of each partition as the replay begins.
    """
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False)
    available = consumer.partitions_for_topic(topic)
    if not available:
        consumer.close()
        raise SourceError(f"topic {topic!r} does not exist")
    parts = [TopicPartition(topic, p) for p in sorted(partitions or available)]
    consumer.assign(parts)
    for tp in parts:
        consumer.seek(tp, start)
    producer = _producer(settings)
    report = ReplayReport()
    started_ms = int(time.time() * 1000)
    try:
        for record in _read_until_idle(consumer):
            # The range is what the topic held when the replay began: records
            # stamped later (our own re-published ones among them) are past it.
            past_range = record.timestamp >= started_ms
            if past_range or (end is not None and record.offset >= end):
                consumer.pause(TopicPartition(record.topic, record.partition))
                if set(consumer.paused()) == set(parts):
                    break
                continue
            value = _retarget(record, model)
            if value is None:
                report.skipped += 1
                continue
            producer.send(topic, key=record.key, value=value)
            report.published += 1
        producer.flush()
    finally:
        consumer.close()
        producer.close()
    return report


def _read_until_idle(consumer: KafkaConsumer, join_timeout_s: float = 60) -> Iterator[Any]:
    """Records until the consumer has partitions and nothing new came for a while."""
    started = time.monotonic()
    idle_since: float | None = None
    while True:
        records = [r for batch in consumer.poll(timeout_ms=200).values() for r in batch]
        if records:
            idle_since = None
            yield from records
        elif consumer.assignment():
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > _IDLE_MS / 1000:
                return
        elif time.monotonic() - started > join_timeout_s:
            raise SourceError(f"no partitions assigned within {join_timeout_s:.0f}s")


def _retarget(record: Any, model: str) -> bytes | None:
    """The envelope with ``model`` replaced and its id and version pinned to the
    original record's (a re-published record has a new position and timestamp);
    None if the value is not an envelope."""
    try:
        body = json.loads(record.value or b"")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    body["model"] = model
    if body.get("id") is None:
        key = record.key.decode("utf-8", "replace") if record.key else None
        body["id"] = key or f"{record.topic}:{record.partition}:{record.offset}"
    body.setdefault("version", max(0, record.timestamp))
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _producer(settings: Settings) -> KafkaProducer:
    return KafkaProducer(**client_config(settings), acks="all", linger_ms=5, retries=10)
