"""Reprocessing: re-drive dead letters after a fix, re-embed a topic range.

``redrive_dead_letters`` publishes dead letters' original key and value back
to their source topics (from the ``embedstream.source.topic`` header), all of
them or those of some reasons. Each letter is re-driven once, however often
and with whatever filter the command runs: progress is kept per reason, as
the committed offsets of the consumer groups ``<group_id>-redrive.<reason>``,
plus ``<group_id>-redrive`` for runs over every reason; a letter counts as
re-driven when either its reason's group or the every-reason group has
passed it. So ``--reason unknown_model`` leaves the other reasons' letters
where they are, for a later run. Offsets move only after the re-published
records are acknowledged. A letter that is a reference to a record too large
to copy (header ``embedstream.value: reference``) is re-driven from the
original, read back at its source position while the topic still has it.

``reembed_range`` reads a range of a topic and publishes each event again
with ``model`` set to the new model and ``version`` pinned to the original
record's version (its own ``version`` or timestamp), so a re-embedding never
looks newer than the data it came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from embedstream.envelope import HEADER_TENANT, REASONS
from embedstream.errors import SourceError
from embedstream.settings import Settings
from embedstream.sources.common import HEADER_VALUE_KIND, LETTER_HEADERS
from embedstream.sources.kafka import client_config

log = logging.getLogger(__name__)

_IDLE_MS = 3000  # a read that brings nothing for this long has reached the end


@dataclass
class ReplayReport:
    published: int = 0
    skipped: int = 0
    """Letters of other reasons (left for another run), or without a source."""
    already: int = 0
    """Letters an earlier run re-drove."""
    unrecoverable: int = 0
    """References whose original the source topic no longer holds."""
    by_reason: Counter[str] = field(default_factory=Counter)


def redrive_dead_letters(
    settings: Settings, *, reasons: set[str] | None = None, dry_run: bool = False
) -> ReplayReport:
    """Publish dead letters (of ``reasons``, or all) back to their source topics."""
    reader = KafkaConsumer(**client_config(settings.kafka), enable_auto_commit=False, group_id=None)
    partitions = sorted(reader.partitions_for_topic(settings.topic_dlq) or ())
    tps = [TopicPartition(settings.topic_dlq, p) for p in partitions]
    cursors = _Cursors(settings, tps)
    producer = None if dry_run else _producer(settings)
    report = ReplayReport()
    try:
        if not tps:
            return report
        reader.assign(tps)
        for tp in tps:  # from the earliest position any wanted reason still needs
            reader.seek(tp, cursors.start(tp, reasons))
        read_to: dict[TopicPartition, int] = {}
        started_ms = int(time.time() * 1000)
        for record in _read_until_idle(reader):
            tp = TopicPartition(record.topic, record.partition)
            if record.timestamp >= started_ms:
                # Written since this run began (a re-driven event that failed again, say):
                # the next run's business, or this run would chase its own tail.
                reader.pause(tp)
                if set(reader.paused()) == set(tps):
                    break
                continue
            read_to[tp] = record.offset + 1
            headers = dict(record.headers or ())
            reason = headers.get("embedstream.reason", b"").decode("utf-8", "replace")
            source = headers.get("embedstream.source.topic", b"").decode("utf-8", "replace")
            if not source or (reasons and reason not in reasons):
                report.skipped += 1
                continue
            if record.offset < cursors.position(tp, reason):
                report.already += 1  # re-driven by an earlier run
                continue
            original = _original(settings, record, headers)
            if original is None:
                report.unrecoverable += 1
                continue
            report.by_reason[reason] += 1
            if producer is not None:
                key, value, kept = original
                kept.append(("embedstream.redriven_from",
                             f"{record.topic}:{record.partition}:{record.offset}".encode()))
                producer.send(source, key=key, value=value, headers=kept)
            report.published += 1
        if producer is not None:
            producer.flush()
            cursors.advance(read_to, reasons or set(REASONS) | set(report.by_reason))
    finally:
        reader.close()
        cursors.close()
        if producer is not None:
            producer.close()
    if dry_run:
        report.published = 0
    return report


class _Cursors:
    """Re-drive progress per reason: committed offsets of ``<group>-redrive[.<reason>]``."""

    def __init__(self, settings: Settings, tps: list[TopicPartition]) -> None:
        self._settings = settings
        self._tps = tps
        self._base = f"{settings.group_id}-redrive"
        self._groups: dict[str | None, KafkaConsumer] = {}
        self._committed: dict[str | None, dict[TopicPartition, int]] = {}

    def _group(self, reason: str | None) -> KafkaConsumer:
        if reason not in self._groups:
            name = self._base if reason is None else f"{self._base}.{reason}"
            consumer = KafkaConsumer(**client_config(self._settings.kafka), group_id=name,
                                     enable_auto_commit=False)
            self._groups[reason] = consumer
            self._committed[reason] = {tp: consumer.committed(tp) or 0 for tp in self._tps}
        return self._groups[reason]

    def _offset(self, reason: str | None, tp: TopicPartition) -> int:
        self._group(reason)
        return self._committed[reason][tp]

    def position(self, tp: TopicPartition, reason: str) -> int:
        """Letters of ``reason`` before this offset were re-driven already."""
        return max(self._offset(None, tp), self._offset(reason, tp))

    def start(self, tp: TopicPartition, reasons: set[str] | None) -> int:
        if not reasons:
            return self._offset(None, tp)
        return min(self.position(tp, r) for r in reasons)

    def advance(self, ends: dict[TopicPartition, int], reasons: set[str]) -> None:
        """Everything read up to ``ends`` is done for ``reasons`` (all: the base group)."""
        if not ends:
            return
        every = set(reasons) >= set(REASONS)
        for reason in [None] if every else sorted(reasons):
            offsets = {tp: OffsetAndMetadata(max(end, self._offset(reason, tp)), "", -1)
                       for tp, end in ends.items()}
            self._group(reason).commit(offsets)

    def close(self) -> None:
        for consumer in self._groups.values():
            consumer.close(autocommit=False)


def _original(
    settings: Settings, letter: Any, headers: dict[str, bytes]
) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]] | None:
    """The record a letter stands for: key, value and its own headers (None if gone)."""
    kept = [(k, v) for k, v in letter.headers or () if k not in LETTER_HEADERS]
    if headers.get(HEADER_VALUE_KIND) != b"reference":
        return letter.key, letter.value, kept
    try:
        ref = json.loads(letter.value)
        tp = TopicPartition(ref["topic"], int(ref["partition"]))
        offset = int(ref["offset"])
    except (ValueError, KeyError, TypeError):
        log.warning("dead letter %s:%d@%d: unreadable reference", letter.topic,
                    letter.partition, letter.offset)
        return None
    size = int(ref.get("value_bytes") or 0)
    reader = KafkaConsumer(**client_config(settings.kafka), enable_auto_commit=False, group_id=None,
                           max_partition_fetch_bytes=max(1 << 20, size * 2),
                           fetch_max_bytes=max(50 << 20, size * 2))
    try:
        reader.assign([tp])
        reader.seek(tp, offset)
        record = _first_record(reader, tp, timeout_s=3 * _IDLE_MS / 1000)
    finally:
        reader.close()
    if record is None or record.offset != offset:  # deleted by retention, or compacted
        log.warning("the original of %s:%d@%d is gone", *tp, offset)
        return None
    if hashlib.sha256(record.value or b"").hexdigest() != ref.get("value_sha256"):
        log.warning("the original of %s:%d@%d does not match its reference", *tp, offset)
        return None
    return record.key, record.value, list(record.headers or ())


def _first_record(consumer: KafkaConsumer, tp: TopicPartition, timeout_s: float) -> Any:
    """The first record a poll of ``tp`` brings within ``timeout_s``, or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = consumer.poll(timeout_ms=200).get(tp)
        if records:
            return records[0]
    return None


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
    consumer = KafkaConsumer(**client_config(settings.kafka), enable_auto_commit=False)
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
            # the tenant stays the event's: a re-embedded item lands in its tenant's space
            tenant = [(k, v) for k, v in record.headers or () if k == HEADER_TENANT]
            producer.send(topic, key=record.key, value=value, headers=tenant or None)
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
    # Room for an original re-driven from a reference (the broker has its own limit).
    return KafkaProducer(**client_config(settings.kafka), acks="all", linger_ms=5, retries=10,
                         max_request_size=64 << 20)
