"""Kafka with kafka-python: the consumer, the producers, topic admin, the tools' readers.

Why not faust: faust's commit path can commit past an in-flight event
(faust-streaming issue #606, fix still open), which breaks "commit only what
is stored". A plain consumer with manual commits and an offset tracker makes
that guarantee explicit and testable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import (
    CommitFailedError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    TopicAlreadyExistsError,
)
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTP

from embedstream import __version__
from embedstream.envelope import RawRecord
from embedstream.errors import BrokerUnavailable, DeliveryFailed, SourceError
from embedstream.sections import KafkaSettings
from embedstream.sources.base import RebalanceListener, TopicPartition
from embedstream.sources.common import BrokerProbe, check_sasl, dead_letter

log = logging.getLogger(__name__)

# A commit waits at most this long for the coordinator (then it is retried with the next).
_COMMIT_TIMEOUT_MS = 10_000


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """Connection and security settings shared by every Kafka client embedstream creates."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers(),
        "client_id": f"embedstream-{__version__}",
        "security_protocol": settings.kafka_security_protocol,
    }
    check_sasl(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        assert settings.kafka_sasl_password is not None  # checked by check_sasl
        config.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=settings.kafka_sasl_password.get_secret_value(),
        )
    for option in ("cafile", "certfile", "keyfile"):
        path = getattr(settings, f"kafka_ssl_{option}")
        if path is not None:
            config[f"ssl_{option}"] = str(path)
    return config


def ensure_topics(settings: KafkaSettings, topics: list[str]) -> list[str]:
    """Create the missing ``topics`` with the configured partitions; return those created.

    Safe when several workers race to create the same topic.
    """
    try:
        admin = KafkaAdminClient(**client_config(settings), request_timeout_ms=15_000)
    except KafkaError as err:
        raise BrokerUnavailable(
            f"cannot reach Kafka at {settings.kafka_bootstrap}: {err}. "
            "Is the broker running? (embedstream dev up starts one)"
        ) from err
    try:
        existing = set(admin.list_topics())
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        created = []
        for topic in missing:
            try:
                admin.create_topics(
                    [NewTopic(topic, settings.topic_partitions, settings.topic_replication)]
                )
                created.append(topic)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics %s with %d partitions", created, settings.topic_partitions)
        return created
    except KafkaError as err:
        raise SourceError(f"cannot create topics {topics}: {err}") from err
    finally:
        admin.close()


class _Listener(ConsumerRebalanceListener):
    def __init__(self, listener: RebalanceListener) -> None:
        self._listener = listener

    def on_partitions_revoked(self, revoked: Any) -> None:
        tps = {(tp.topic, tp.partition) for tp in revoked}
        if tps:
            log.info("partitions revoked: %s", sorted(tps))
            self._listener.revoked(tps)

    def on_partitions_assigned(self, assigned: Any) -> None:
        tps = {(tp.topic, tp.partition) for tp in assigned}
        log.info("partitions assigned: %s", sorted(tps))
        self._listener.assigned(tps)


class KafkaSource:
    """A consumer-group member. See :class:`~embedstream.sources.base.Source`.

    kafka-python (3.x) runs rebalance listeners on its I/O thread, where
    blocking consumer calls are refused: the listener may only use
    :meth:`commit_nowait`. A partition assigned again keeps its fetch position.
    """

    def __init__(self, settings: KafkaSettings, topics: list[str], listener: RebalanceListener) -> None:
        try:
            self._consumer = KafkaConsumer(
                **client_config(settings),
                group_id=settings.group_id,
                enable_auto_commit=False,
                auto_offset_reset=settings.auto_offset_reset,
                session_timeout_ms=settings.session_timeout_ms,
                heartbeat_interval_ms=settings.heartbeat_interval_ms,
                max_poll_interval_ms=settings.max_poll_interval_ms,
                max_poll_records=settings.max_poll_records,
                fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
                max_partition_fetch_bytes=settings.kafka_max_partition_fetch_bytes,
            )
        except KafkaError as err:
            raise SourceError(f"cannot connect to Kafka at {settings.kafka_bootstrap}: {err}") from err
        self._consumer.subscribe(topics=topics, listener=_Listener(listener))
        self._paused = False
        self._probe = BrokerProbe(settings.bootstrap_servers())

    def poll(self, timeout_s: float) -> list[RawRecord]:
        return _records(self._consumer.poll(timeout_ms=int(timeout_s * 1000)))

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        if not offsets:
            return True
        payload = _offsets(offsets)
        try:
            self._consumer.commit(offsets=payload, timeout_ms=_COMMIT_TIMEOUT_MS)
        except CommitFailedError as err:
            log.warning("commit rejected (group rebalanced); events will be redelivered: %s", err)
            return False
        except KafkaError as err:
            log.warning("commit failed; will retry with the next commit: %s", err)
            return False
        return True

    def commit_nowait(self, offsets: dict[TopicPartition, int]) -> None:
        if offsets:
            self._consumer.commit_async(offsets=_offsets(offsets))

    def pause(self) -> None:
        if not self._paused:
            self._consumer.pause(*self._consumer.assignment())
            self._paused = True

    def resume(self) -> None:
        if self._paused:
            self._consumer.resume(*self._consumer.paused())
            self._paused = False

    def connected(self) -> bool:
        """True when a bootstrap broker accepts a TCP connection (see :class:`BrokerProbe`)."""
        return self._probe()

    def lag(self) -> dict[TopicPartition, int]:
        out = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = self._consumer.position(tp, timeout_ms=1000)
            except KafkaError:
                continue
            if position is not None:
                out[(tp.topic, tp.partition)] = max(0, high - position)
        return out

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def _records(batches: dict[Any, list[Any]]) -> list[RawRecord]:
    return [
        RawRecord(topic=r.topic, partition=r.partition, offset=r.offset, key=r.key, value=r.value,
                  timestamp_ms=r.timestamp, headers=tuple(r.headers or ()))
        for records in batches.values() for r in records
    ]


class KafkaTopicReader:
    """A consumer without a group. See :class:`~embedstream.sources.base.TopicReader`.

    ``max_record_bytes``: the largest record it must be able to fetch (a
    re-driven original can be larger than the worker's fetch limit).
    """

    def __init__(self, settings: KafkaSettings, *, max_record_bytes: int = 1 << 20) -> None:
        try:
            self._consumer = KafkaConsumer(
                **client_config(settings), group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=max(1 << 20, 2 * max_record_bytes),
                fetch_max_bytes=max(50 << 20, 2 * max_record_bytes),
            )
        except KafkaError as err:
            raise BrokerUnavailable(f"cannot connect to Kafka at {settings.kafka_bootstrap}: {err}") from err
        self._stopped: set[TopicPartition] = set()

    def partitions(self, topic: str) -> list[int]:
        return sorted(self._consumer.partitions_for_topic(topic) or ())

    def bounds(self, partitions: list[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        if not partitions:
            return {}
        tps = [KafkaTP(*tp) for tp in partitions]
        try:
            firsts = self._consumer.beginning_offsets(tps)
            ends = self._consumer.end_offsets(tps)
        except KafkaError as err:
            raise SourceError(f"cannot read the offsets of {sorted(partitions)}: {err}") from err
        return {(tp.topic, tp.partition): (int(firsts[tp]), int(ends[tp])) for tp in tps}

    def read_from(self, positions: dict[TopicPartition, int]) -> None:
        firsts = self.bounds(list(positions))
        self._consumer.assign([KafkaTP(*tp) for tp in positions])
        for tp, offset in positions.items():
            self._consumer.seek(KafkaTP(*tp), max(offset, firsts[tp][0]))
        self._stopped.clear()

    def poll(self, timeout_s: float) -> list[RawRecord]:
        records = _records(self._consumer.poll(timeout_ms=int(timeout_s * 1000)))
        if self._stopped:
            records = [r for r in records if (r.topic, r.partition) not in self._stopped]
        return records

    def stop(self, partition: TopicPartition) -> None:
        self._consumer.pause(KafkaTP(*partition))
        self._stopped.add(partition)

    def stopped(self) -> set[TopicPartition]:
        return set(self._stopped)

    def close(self) -> None:
        self._consumer.close(autocommit=False)


class KafkaGroupOffsets:
    """See :class:`~embedstream.sources.base.GroupOffsets`: a consumer of the group that
    never subscribes, so it commits without joining (and moving) the group."""

    def __init__(self, settings: KafkaSettings, group: str) -> None:
        self._group = group
        try:
            self._consumer = KafkaConsumer(**client_config(settings), group_id=group,
                                           enable_auto_commit=False)
        except KafkaError as err:
            raise BrokerUnavailable(f"cannot connect to Kafka at {settings.kafka_bootstrap}: {err}") from err

    def committed(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        out = {}
        for tp in partitions:
            try:
                offset = self._consumer.committed(KafkaTP(*tp))
            except KafkaError as err:
                raise SourceError(f"cannot read group {self._group}'s offsets: {err}") from err
            if offset is not None:
                out[tp] = int(offset)
        return out

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=_offsets(offsets), timeout_ms=_COMMIT_TIMEOUT_MS)
        except KafkaError as err:
            raise SourceError(f"cannot commit group {self._group}'s offsets: {err}") from err

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def _offsets(offsets: dict[TopicPartition, int]) -> dict[KafkaTP, OffsetAndMetadata]:
    return {
        KafkaTP(topic, partition): OffsetAndMetadata(offset, "", -1)
        for (topic, partition), offset in offsets.items()
    }


class KafkaDeadLetters:
    """Dead-letter producer. See :class:`~embedstream.sources.base.DeadLetters`.

    The value is the original payload, untouched, when the letter fits
    ``dlq_max_record_bytes``; otherwise a reference to it (see
    :func:`~embedstream.sources.common.dead_letter`). Headers carry the reason,
    a human-readable detail and the source position, plus the original headers,
    so the event can be fixed and re-driven.
    """

    def __init__(self, settings: KafkaSettings, topic: str | None = None) -> None:
        self.topic = topic or settings.topic_dlq
        self._max_bytes = settings.dlq_max_record_bytes
        self._producer = KafkaProducer(
            **client_config(settings), acks="all", retries=10, linger_ms=5,
            max_request_size=settings.dlq_max_record_bytes,
            # send() waits this long for topic metadata while the broker is away;
            # then the letter fails (and is retried) instead of blocking a stage.
            max_block_ms=5_000,
        )

    def send(
        self,
        record: RawRecord,
        reason: str,
        detail: str,
        on_done: Callable[[], None],
        on_error: Callable[[Exception], None],
    ) -> None:
        self._send(record, reason, detail, on_done, on_error, minimal=False)

    def _send(
        self,
        record: RawRecord,
        reason: str,
        detail: str,
        on_done: Callable[[], None],
        on_error: Callable[[Exception], None],
        *,
        minimal: bool,
    ) -> None:
        def failed(err: Exception) -> None:
            if isinstance(err, MessageSizeTooLargeError) and not minimal:
                # Refused for its size after all: the smallest form always fits.
                self._send(record, reason, detail, on_done, on_error, minimal=True)
            else:
                on_error(err)

        letter = dead_letter(record, reason, detail, self._max_bytes, minimal=minimal)
        try:
            future = self._producer.send(
                self.topic, key=letter.key, value=letter.value, headers=letter.headers
            )
        except Exception as err:  # refused at once: too large, no metadata, closed
            failed(err)
            return
        future.add_callback(lambda _meta: on_done())
        future.add_errback(failed)

    def flush(self, timeout_s: float) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self._producer.close(timeout=10)


class KafkaSender:
    """kafka-python behind :class:`~embedstream.sources.base.RecordSender`.

    ``connect_timeout_s`` bounds the wait for the broker at construction (then
    :class:`~embedstream.errors.BrokerUnavailable`); ``max_block_s`` bounds how long
    ``send`` blocks for a topic's metadata while the broker is away;
    ``max_record_bytes`` raises the largest record it sends (default: the client's).
    """

    def __init__(self, settings: KafkaSettings, *, connect_timeout_s: float = 30.0,
                 max_block_s: float = 60.0, max_record_bytes: int | None = None) -> None:
        try:
            self._producer = KafkaProducer(
                **client_config(settings), acks="all", linger_ms=5, retries=10,
                bootstrap_timeout_ms=int(connect_timeout_s * 1000),
                max_block_ms=int(max_block_s * 1000),
                **({"max_request_size": max_record_bytes} if max_record_bytes else {}),
            )
        except KafkaError as err:
            raise BrokerUnavailable(
                f"cannot connect to Kafka at {settings.kafka_bootstrap}: {err}") from err

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None = None) -> Future[None]:
        done: Future[None] = Future()
        try:
            future = self._producer.send(topic, key=key, value=value, headers=headers or None)
        except KafkaError as err:
            raise _delivery_failed(err) from err
        future.add_callback(lambda _metadata: done.set_result(None))
        future.add_errback(lambda err: done.set_exception(_delivery_failed(err)))
        return done

    def flush(self, timeout_s: float) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as err:
            raise SourceError(f"records not confirmed within {timeout_s}s: {err}") from err

    def close(self, timeout_s: float) -> None:
        self._producer.close(timeout=timeout_s)


def _delivery_failed(err: Exception) -> DeliveryFailed:
    retriable = isinstance(err, KafkaTimeoutError) or bool(getattr(err, "retriable", False))
    return DeliveryFailed(f"broker did not take the record: {err}", retriable)
