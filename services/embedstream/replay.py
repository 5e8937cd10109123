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

Both read and write through the client library ``kafka_client`` names (see
:mod:`embedstream.sources.registry`): a :class:`~embedstream.sources.base.TopicReader`
reads, :class:`~embedstream.sources.base.GroupOffsets` keeps the re-drive
progress, a :class:`~embedstream.sources.base.RecordSender` publishes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from embedstream.envelope import HEADER_TENANT, REASONS, RawRecord
from embedstream.errors import SourceError
from embedstream.sections import KafkaSettings
from embedstream.sources.base import GroupOffsets, RecordSender, TopicPartition, TopicReader
from embedstream.sources.common import HEADER_VALUE_KIND, LETTER_HEADERS
from embedstream.sources.registry import KafkaClient, kafka_client

log = logging.getLogger(__name__)

_IDLE_S = 3.0  # a read that brings nothing for this long has reached the end
_MAX_RECORD_BYTES = 64 << 20  # room for an original re-driven from a reference
_FLUSH_TIMEOUT_S = 120.0


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
    settings: KafkaSettings, *, reasons: set[str] | None = None, dry_run: bool = False
) -> ReplayReport:
    """Publish dead letters (of ``reasons``, or all) back to their source topics."""
    client = kafka_client(settings.kafka_client)
    reader = client.reader(settings)
    tps = [(settings.topic_dlq, p) for p in reader.partitions(settings.topic_dlq)]
    cursors = _Cursors(client, settings, tps)
    publisher = None if dry_run else _Publisher(client, settings)
    report = ReplayReport()
    try:
        if not tps:
            return report
        # from the earliest position any wanted reason still needs
        reader.read_from({tp: cursors.start(tp, reasons) for tp in tps})
        read_to: dict[TopicPartition, int] = {}
        started_ms = int(time.time() * 1000)
        for record in _read_until_idle(reader):
            tp = (record.topic, record.partition)
            if record.timestamp_ms >= started_ms:
                # Written since this run began (a re-driven event that failed again, say):
                # the next run's business, or this run would chase its own tail.
                reader.stop(tp)
                if reader.stopped() >= set(tps):
                    break
                continue
            read_to[tp] = record.offset + 1
            headers = dict(record.headers)
            reason = headers.get("embedstream.reason", b"").decode("utf-8", "replace")
            source = headers.get("embedstream.source.topic", b"").decode("utf-8", "replace")
            if not source or (reasons and reason not in reasons):
                report.skipped += 1
                continue
            if record.offset < cursors.position(tp, reason):
                report.already += 1  # re-driven by an earlier run
                continue
            original = _original(client, settings, record, headers)
            if original is None:
                report.unrecoverable += 1
                continue
            report.by_reason[reason] += 1
            if publisher is not None:
                key, value, kept = original
                kept.append(("embedstream.redriven_from",
                             f"{record.topic}:{record.partition}:{record.offset}".encode()))
                publisher.send(source, key, value, kept)
            report.published += 1
        if publisher is not None:
            publisher.confirm()  # every re-published record acknowledged, or SourceError
            cursors.advance(read_to, reasons or set(REASONS) | set(report.by_reason))
    finally:
        reader.close()
        cursors.close()
        if publisher is not None:
            publisher.close()
    if dry_run:
        report.published = 0
    return report


class _Cursors:
    """Re-drive progress per reason: committed offsets of ``<group>-redrive[.<reason>]``."""

    def __init__(self, client: KafkaClient, settings: KafkaSettings, tps: list[TopicPartition]) -> None:
        self._client = client
        self._settings = settings
        self._tps = tps
        self._base = f"{settings.group_id}-redrive"
        self._groups: dict[str | None, GroupOffsets] = {}
        self._committed: dict[str | None, dict[TopicPartition, int]] = {}

    def _group(self, reason: str | None) -> GroupOffsets:
        if reason not in self._groups:
            name = self._base if reason is None else f"{self._base}.{reason}"
            group = self._client.group_offsets(self._settings, name)
            self._groups[reason] = group
            self._committed[reason] = group.committed(self._tps)
        return self._groups[reason]

    def _offset(self, reason: str | None, tp: TopicPartition) -> int:
        self._group(reason)
        return self._committed[reason].get(tp, 0)

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
            self._group(reason).commit({tp: max(end, self._offset(reason, tp))
                                        for tp, end in ends.items()})

    def close(self) -> None:
        for group in self._groups.values():
            group.close()


class _Publisher:
    """Re-publishes through the configured client and checks every acknowledgement."""

    def __init__(self, client: KafkaClient, settings: KafkaSettings) -> None:
        self._sender: RecordSender = client.sender(settings, max_record_bytes=_MAX_RECORD_BYTES)
        self._pending: list[Future[None]] = []

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None) -> None:
        self._pending.append(self._sender.send(topic, key, value, headers))

    def confirm(self) -> None:
        """Wait for every record sent; SourceError naming the first refusal."""
        self._sender.flush(_FLUSH_TIMEOUT_S)
        failed = [err for f in self._pending if (err := f.exception(_FLUSH_TIMEOUT_S)) is not None]
        self._pending.clear()
        if failed:
            raise SourceError(f"{len(failed)} re-published records were refused (the progress "
                              f"is not moved, so a later run sends them again): {failed[0]}")

    def close(self) -> None:
        self._sender.close(10)


def _original(
    client: KafkaClient, settings: KafkaSettings, letter: RawRecord, headers: dict[str, bytes]
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]]] | None:
    """The record a letter stands for: key, value and its own headers (None if gone)."""
    kept = [(k, v) for k, v in letter.headers if k not in LETTER_HEADERS]
    if headers.get(HEADER_VALUE_KIND) != b"reference":
        return letter.key, letter.value, kept
    try:
        ref = json.loads(letter.value or b"")
        tp = (str(ref["topic"]), int(ref["partition"]))
        offset = int(ref["offset"])
    except (ValueError, KeyError, TypeError):
        log.warning("dead letter %s:%d@%d: unreadable reference", letter.topic,
                    letter.partition, letter.offset)
        return None
    reader = client.reader(settings, max_record_bytes=int(ref.get("value_bytes") or 0))
    try:
        reader.read_from({tp: offset})
        record = _first_record(reader, timeout_s=3 * _IDLE_S)
    finally:
        reader.close()
    if record is None or record.offset != offset:  # deleted by retention, or compacted
        log.warning("the original of %s:%d@%d is gone", *tp, offset)
        return None
    if hashlib.sha256(record.value or b"").hexdigest() != ref.get("value_sha256"):
        log.warning("the original of %s:%d@%d does not match its reference", *tp, offset)
        return None
    return record.key, record.value, list(record.headers)


def _first_record(reader: TopicReader, timeout_s: float) -> RawRecord | None:
    """The first record a poll brings within ``timeout_s``, or None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = reader.poll(0.2)
        if records:
            return records[0]
    return None


def reembed_range(
    settings: KafkaSettings,
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
    client = kafka_client(settings.kafka_client)
    reader = client.reader(settings)
    try:
        available = reader.partitions(topic)
        if not available:
            raise SourceError(f"topic {topic!r} does not exist")
        unknown = sorted(set(partitions or ()) - set(available))
        if unknown:
            raise SourceError(f"topic {topic!r} has no partition {unknown[0]} "
                              f"(it has 0 to {max(available)})")
        parts = [(topic, p) for p in sorted(partitions or available)]
        report = ReplayReport()
        reader.read_from(dict.fromkeys(parts, start))
        publisher = _Publisher(client, settings)
        started_ms = int(time.time() * 1000)
        try:
            for record in _read_until_idle(reader):
                # The range is what the topic held when the replay began: records
                # stamped later (our own re-published ones among them) are past it.
                past_range = record.timestamp_ms >= started_ms
                if past_range or (end is not None and record.offset >= end):
                    reader.stop((record.topic, record.partition))
                    if reader.stopped() >= set(parts):
                        break
                    continue
                value = _retarget(record, model)
                if value is None:
                    report.skipped += 1
                    continue
                # the tenant stays the event's: a re-embedded item lands in its tenant's space
                tenant = [(k, v) for k, v in record.headers if k == HEADER_TENANT]
                publisher.send(topic, record.key, value, tenant or None)
                report.published += 1
            publisher.confirm()
        finally:
            publisher.close()
    finally:
        reader.close()
    return report


def _read_until_idle(reader: TopicReader) -> Iterator[RawRecord]:
    """Records until nothing new came for a while (the reader has reached the end)."""
    idle_since: float | None = None
    while True:
        records = reader.poll(0.2)
        if records:
            idle_since = None
            yield from records
        else:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > _IDLE_S:
                return


def _retarget(record: RawRecord, model: str) -> bytes | None:
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
    body.setdefault("version", max(0, record.timestamp_ms))
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
