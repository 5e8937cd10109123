"""Kafka with confluent-kafka (librdkafka): the consumer, the producers, topic admin, tools' readers.

The same contract as :mod:`embedstream.sources.kafka` (see
:mod:`embedstream.sources.base`); what differs is the library underneath:

- librdkafka fetches and decodes in its own C threads and hands records over
  in batches, so a record costs far less Python time than with kafka-python.
  That is what matters when the model is fast (a GPU): see README,
  "Kafka client ceilings".
- Rebalance callbacks run inside ``poll``/``consume`` on the calling thread,
  the polling thread, as the Source contract says; blocking calls are allowed
  there, and :meth:`ConfluentSource.commit_nowait` is safe too.
- The assignment is eager (``range``), like kafka-python's: every partition is
  revoked before the next assignment, so ``revoked`` sees them all and can
  commit what is finished before another worker takes over; a partition
  assigned again restarts from the committed offset.
- Offsets move only by explicit commits (``enable.auto.commit`` and
  ``enable.auto.offset.store`` off); ``close`` commits nothing.

Imported only when ``kafka_client`` is ``confluent`` (see
:mod:`embedstream.sources.registry`): confluent-kafka is an optional extra.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka import TopicPartition as KafkaTP
from confluent_kafka.admin import AdminClient, NewTopic

from embedstream import __version__
from embedstream.envelope import RawRecord
from embedstream.errors import BrokerUnavailable, DeliveryFailed, SourceError
from embedstream.sections import KafkaSettings
from embedstream.sources.base import RebalanceListener, TopicPartition
from embedstream.sources.common import BrokerProbe, check_sasl, dead_letter

log = logging.getLogger(__name__)


class _Throttle:
    """Let one event per key through every ``every_s`` seconds.

    While a broker is away librdkafka reports the same connection failure
    about 20 times a second, through its log and its error callback alike.
    """

    def __init__(self, every_s: float = 10.0) -> None:
        self._every_s = every_s
        self._last: dict[Hashable, float] = {}

    def __call__(self, key: Hashable) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < self._every_s:
            return False
        self._last[key] = now
        return True


class _LibrdkafkaLogFilter(logging.Filter):
    """One line per (level, librdkafka facility such as FAIL) every 10 s."""

    def __init__(self) -> None:
        super().__init__()
        self._throttle = _Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        return self._throttle((record.levelno, record.getMessage().split(" ", 1)[0]))


# librdkafka's own log lines, served inside poll() by the thread that polls.
_rdkafka_log = logging.getLogger(f"{__name__}.librdkafka")
_rdkafka_log.addFilter(_LibrdkafkaLogFilter())
_errors_throttle = _Throttle()

# A commit failing with one of these was refused because the group moved on:
# the events are redelivered to the partitions' next owner.
_REBALANCED = frozenset({
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.FENCED_INSTANCE_ID,
    KafkaError._ASSIGNMENT_LOST,
})
_SSL_FILES = (
    ("cafile", "ssl.ca.location"),
    ("certfile", "ssl.certificate.location"),
    ("keyfile", "ssl.key.location"),
)
_ADMIN_TIMEOUT_S = 15.0


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """librdkafka connection and security properties of every client embedstream creates.

    The twin of :func:`embedstream.sources.kafka.client_config`: the same
    settings, under librdkafka's property names.
    """
    check_sasl(settings)
    config: dict[str, Any] = {
        "bootstrap.servers": ",".join(settings.bootstrap_servers()),
        "client.id": f"embedstream-{__version__}",
        "security.protocol": settings.kafka_security_protocol.lower(),
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        assert settings.kafka_sasl_password is not None  # checked by check_sasl
        config.update({
            "sasl.mechanism": settings.kafka_sasl_mechanism,
            "sasl.username": settings.kafka_sasl_username,
            "sasl.password": settings.kafka_sasl_password.get_secret_value(),
        })
    for option, prop in _SSL_FILES:
        path = getattr(settings, f"kafka_ssl_{option}")
        if path is not None:
            config[prop] = str(path)
    return config


def ensure_topics(settings: KafkaSettings, topics: list[str]) -> list[str]:
    """Create the missing ``topics`` with the configured partitions; return those created.

    Safe when several workers race to create the same topic.
    """
    config = {**client_config(settings), "error_cb": _log_error}
    admin = AdminClient(config)
    try:
        existing = set(admin.list_topics(timeout=_ADMIN_TIMEOUT_S).topics)
    except KafkaException as err:
        raise BrokerUnavailable(
            f"cannot reach Kafka at {settings.kafka_bootstrap}: {err}. "
            "Is the broker running? (embedstream dev up starts one)"
        ) from err
    missing = [t for t in dict.fromkeys(topics) if t not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(t, settings.topic_partitions, settings.topic_replication) for t in missing],
        request_timeout=_ADMIN_TIMEOUT_S,
    )
    created = []
    for topic, future in futures.items():
        try:
            future.result()
            created.append(topic)
        except KafkaException as err:
            if _code(err) != KafkaError.TOPIC_ALREADY_EXISTS:
                raise SourceError(f"cannot create topic {topic}: {err}") from err
    if created:
        log.info("created topics %s with %d partitions", created, settings.topic_partitions)
    return created


class ConfluentSource:
    """A consumer-group member. See :class:`~embedstream.sources.base.Source`.

    Only the polling thread may call it (like the kafka-python source); the
    revoke callback runs on that thread, inside :meth:`poll`.
    """

    def __init__(self, settings: KafkaSettings, topics: list[str], listener: RebalanceListener) -> None:
        self._listener = listener
        self._closing = False
        self._max_records = settings.max_poll_records
        self._paused: set[TopicPartition] = set()
        self._probe = BrokerProbe(settings.bootstrap_servers())
        try:
            self._consumer = Consumer({
                **client_config(settings),
                "group.id": settings.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": settings.auto_offset_reset,
                "session.timeout.ms": settings.session_timeout_ms,
                "heartbeat.interval.ms": settings.heartbeat_interval_ms,
                "max.poll.interval.ms": settings.max_poll_interval_ms,
                "fetch.wait.max.ms": settings.kafka_fetch_max_wait_ms,
                "max.partition.fetch.bytes": settings.kafka_max_partition_fetch_bytes,
                # Eager, like kafka-python: every partition is revoked (and its
                # finished events committed) before any is assigned elsewhere.
                "partition.assignment.strategy": "range",
                # Records librdkafka pre-fetches are memory too: bound them by
                # the same budget as the events in flight.
                "queued.max.messages.kbytes": max(1024, settings.max_in_flight_bytes >> 10),
                "on_commit": _on_commit,
                "error_cb": _log_error,
                "logger": _rdkafka_log,
            })
            self._consumer.subscribe(
                topics, on_assign=self._assigned, on_revoke=self._revoked
            )  # lost partitions go to on_revoke too (their commit is refused, harmlessly)
        except KafkaException as err:
            raise SourceError(f"cannot connect to Kafka at {settings.kafka_bootstrap}: {err}") from err

    # ----------------------------------------------------------- rebalances
    def _assigned(self, _consumer: Consumer, partitions: list[KafkaTP]) -> None:
        tps = {(tp.topic, tp.partition) for tp in partitions}
        log.info("partitions assigned: %s", sorted(tps))
        self._listener.assigned(tps)

    def _revoked(self, _consumer: Consumer, partitions: list[KafkaTP]) -> None:
        tps = {(tp.topic, tp.partition) for tp in partitions}
        self._paused -= tps
        if tps and not self._closing:  # close() commits nothing, so it revokes silently
            log.info("partitions revoked: %s", sorted(tps))
            self._listener.revoked(tps)

    # -------------------------------------------------------------- polling
    def poll(self, timeout_s: float) -> list[RawRecord]:
        return _take(self._consumer, timeout_s, self._max_records)

    # -------------------------------------------------------------- commits
    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        if not offsets:
            return True
        try:
            results = self._consumer.commit(offsets=_offsets(offsets), asynchronous=False)
        except KafkaException as err:
            return _commit_failed(err, _code(err))
        for tp in results:
            if tp.error is not None:
                return _commit_failed(tp.error, tp.error.code())
        return True

    def commit_nowait(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=_offsets(offsets), asynchronous=True)
        except KafkaException as err:
            _commit_failed(err, _code(err))

    # --------------------------------------------------------- backpressure
    def pause(self) -> None:
        """Pause every assigned partition, including any assigned since the last call."""
        new = [tp for tp in self._consumer.assignment()
               if (tp.topic, tp.partition) not in self._paused]
        if new:
            self._consumer.pause(new)
            self._paused.update((tp.topic, tp.partition) for tp in new)

    def resume(self) -> None:
        if not self._paused:
            return
        assigned = [tp for tp in self._consumer.assignment()
                    if (tp.topic, tp.partition) in self._paused]
        if assigned:
            self._consumer.resume(assigned)
        self._paused.clear()

    # --------------------------------------------------------------- status
    def connected(self) -> bool:
        """True when a bootstrap broker accepts a TCP connection (see :class:`BrokerProbe`)."""
        return self._probe()

    def lag(self) -> dict[TopicPartition, int]:
        """From the high watermark of the last fetch (no broker request) and the position."""
        assigned = self._consumer.assignment()
        if not assigned:
            return {}
        out = {}
        try:
            positions = self._consumer.position(assigned)
            for tp in positions:
                _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    out[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        except KafkaException as err:
            log.debug("lag unavailable: %s", err)
        return out

    def close(self) -> None:
        self._closing = True
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as err:
            log.warning("consumer close failed: %s", err)


class ConfluentDeadLetters:
    """Dead-letter producer. See :class:`~embedstream.sources.base.DeadLetters`.

    Records and headers are exactly those of
    :class:`~embedstream.sources.kafka.KafkaDeadLetters`. librdkafka runs
    delivery callbacks inside ``poll``: a thread of this object polls, so
    ``on_done`` and ``on_error`` come without the caller polling, on that thread.
    """

    def __init__(self, settings: KafkaSettings, topic: str | None = None) -> None:
        self.topic = topic or settings.topic_dlq
        self._max_bytes = settings.dlq_max_record_bytes
        self._producer = Producer({
            **client_config(settings),
            "acks": "all",
            "linger.ms": 5,
            "delivery.timeout.ms": 120_000,
            "message.max.bytes": settings.dlq_max_record_bytes,
            "error_cb": _log_error,
            "logger": _rdkafka_log,
        })
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._serve, name="embedstream-dlq-poll", daemon=True)
        self._poller.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)

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
        def failed(code: int | None, err: object) -> None:
            if code == KafkaError.MSG_SIZE_TOO_LARGE and not minimal:
                # Refused for its size after all: the smallest form always fits.
                self._send(record, reason, detail, on_done, on_error, minimal=True)
            else:
                on_error(SourceError(f"dead letter not written: {err}"))

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                on_done()
            else:
                failed(err.code(), err)

        letter = dead_letter(record, reason, detail, self._max_bytes, minimal=minimal)
        try:
            self._producer.produce(
                self.topic, value=letter.value, key=letter.key,
                headers=cast(Any, letter.headers), on_delivery=delivered,
            )
        except KafkaException as err:  # refused at once (too large, unknown topic)
            failed(_code(err), err)
        except (BufferError, RuntimeError, TypeError, ValueError) as err:  # queue full, closed
            failed(None, err)

    def flush(self, timeout_s: float) -> None:
        self._producer.flush(timeout_s)

    def close(self) -> None:
        self._closed.set()
        self._poller.join(timeout=5)
        self._producer.flush(10)


def _take(consumer: Consumer, timeout_s: float, max_records: int) -> list[RawRecord]:
    """Wait up to ``timeout_s`` for a record, then take what is already fetched.

    ``consume(n, timeout)`` alone waits for all ``n`` records or the whole
    timeout; waiting for the first and draining the rest without waiting
    returns as soon as anything is there, like kafka-python's ``poll``.
    """
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    messages = [first]
    if max_records > 1:
        messages += consumer.consume(max_records - 1, 0)
    out: list[RawRecord] = []
    for msg in messages:
        err = msg.error()
        if err is not None:
            _message_error(err)
            continue
        out.append(_record(msg))
    return out


def _record(msg: Message) -> RawRecord:
    # Once per record on the polling thread: positional and cast-free, it costs
    # about 1.5 us instead of 2.5 (README: Kafka client ceilings). A consumed
    # record always has its topic, partition and offset.
    _kind, timestamp = msg.timestamp()
    return RawRecord(
        msg.topic(), msg.partition(), msg.offset(),  # type: ignore[arg-type]
        msg.key(), msg.value(), timestamp, tuple(msg.headers() or ()),  # type: ignore[arg-type]
    )


class ConfluentTopicReader:
    """A consumer that joins no group. See :class:`~embedstream.sources.base.TopicReader`.

    librdkafka wants a ``group.id`` for any consumer; this one never subscribes
    or commits, so the group stays empty. ``max_record_bytes``: the largest record
    it must be able to fetch.
    """

    def __init__(self, settings: KafkaSettings, *, max_record_bytes: int = 1 << 20) -> None:
        fetch = max(50 << 20, 2 * max_record_bytes)
        self._max_records = settings.max_poll_records
        self._stopped: set[TopicPartition] = set()
        self._consumer = Consumer({
            **client_config(settings),
            "group.id": f"{settings.group_id}-reader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "max.partition.fetch.bytes": max(1 << 20, 2 * max_record_bytes),
            "fetch.max.bytes": fetch,
            "receive.message.max.bytes": fetch + (1 << 20),
            "error_cb": _log_error,
            "logger": _rdkafka_log,
        })

    def partitions(self, topic: str) -> list[int]:
        try:
            metadata = self._consumer.list_topics(topic, timeout=_ADMIN_TIMEOUT_S)
        except KafkaException as err:
            raise BrokerUnavailable(f"cannot read the metadata of {topic!r}: {err}") from err
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            return []
        return sorted(found.partitions)

    def bounds(self, partitions: list[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        out = {}
        for topic, partition in partitions:
            try:
                low, high = self._consumer.get_watermark_offsets(
                    KafkaTP(topic, partition), timeout=_ADMIN_TIMEOUT_S)
            except KafkaException as err:
                raise SourceError(f"cannot read the offsets of {topic}:{partition}: {err}") from err
            out[(topic, partition)] = (int(low), int(high))
        return out

    def read_from(self, positions: dict[TopicPartition, int]) -> None:
        firsts = self.bounds(list(positions))
        self._consumer.assign([KafkaTP(t, p, max(offset, firsts[(t, p)][0]))
                               for (t, p), offset in positions.items()])
        self._stopped.clear()

    def poll(self, timeout_s: float) -> list[RawRecord]:
        records = _take(self._consumer, timeout_s, self._max_records)
        if self._stopped:
            records = [r for r in records if (r.topic, r.partition) not in self._stopped]
        return records

    def stop(self, partition: TopicPartition) -> None:
        self._consumer.pause([KafkaTP(*partition)])
        self._stopped.add(partition)

    def stopped(self) -> set[TopicPartition]:
        return set(self._stopped)

    def close(self) -> None:
        self._consumer.close()


class ConfluentGroupOffsets:
    """See :class:`~embedstream.sources.base.GroupOffsets`: a consumer of the group that
    never subscribes, so it commits without joining (and moving) the group."""

    def __init__(self, settings: KafkaSettings, group: str) -> None:
        self._group = group
        self._consumer = Consumer({
            **client_config(settings), "group.id": group, "enable.auto.commit": False,
            "enable.auto.offset.store": False, "error_cb": _log_error, "logger": _rdkafka_log,
        })

    def committed(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        if not partitions:
            return {}
        try:
            found = self._consumer.committed([KafkaTP(*tp) for tp in partitions],
                                             timeout=_ADMIN_TIMEOUT_S)
        except KafkaException as err:
            raise SourceError(f"cannot read group {self._group}'s offsets: {err}") from err
        return {(tp.topic, tp.partition): tp.offset for tp in found if tp.offset >= 0}

    def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        try:
            results = self._consumer.commit(offsets=_offsets(offsets), asynchronous=False)
        except KafkaException as err:
            raise SourceError(f"cannot commit group {self._group}'s offsets: {err}") from err
        failed = [tp for tp in results or () if tp.error is not None]
        if failed:
            raise SourceError(f"cannot commit group {self._group}'s offsets: {failed[0].error}")

    def close(self) -> None:
        self._consumer.close()


class ConfluentSender:
    """librdkafka behind :class:`~embedstream.sources.base.RecordSender`.

    A thread of this object polls, so delivery callbacks (which complete the
    futures) come without the caller polling. ``produce`` queues locally and never
    waits for metadata, so ``max_block_s`` has nothing to bound here; a full local
    queue is a retriable :class:`~embedstream.errors.DeliveryFailed`.
    """

    def __init__(self, settings: KafkaSettings, *, connect_timeout_s: float = 30.0,
                 max_block_s: float = 60.0, max_record_bytes: int | None = None) -> None:
        del max_block_s
        self._producer = Producer({
            **client_config(settings), "acks": "all", "linger.ms": 5,
            **({"message.max.bytes": max_record_bytes} if max_record_bytes else {}),
            "error_cb": _log_error, "logger": _rdkafka_log,
        })
        try:  # the twin of kafka-python's bootstrap check
            self._producer.list_topics(timeout=connect_timeout_s)
        except KafkaException as err:
            raise BrokerUnavailable(
                f"cannot connect to Kafka at {settings.kafka_bootstrap}: {err}") from err
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._serve, name="embedstream-producer-poll",
                                        daemon=True)
        self._poller.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)

    def send(self, topic: str, key: bytes | None, value: bytes | None,
             headers: list[tuple[str, bytes]] | None = None) -> Future[None]:
        done: Future[None] = Future()

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                done.set_result(None)
            else:
                done.set_exception(DeliveryFailed(f"broker did not take the record: {err}",
                                                  bool(err.retriable())))

        try:
            self._producer.produce(topic, value=value, key=key,
                                   headers=cast(Any, headers or None), on_delivery=delivered)
        except BufferError as err:  # the local queue is full
            raise DeliveryFailed(f"producer queue full: {err}", True) from err
        except KafkaException as err:  # refused at once (too large, unknown topic)
            first = err.args[0] if err.args else None
            retriable = isinstance(first, KafkaError) and bool(first.retriable())
            raise DeliveryFailed(f"broker did not take the record: {err}", retriable) from err
        return done

    def flush(self, timeout_s: float) -> None:
        left = self._producer.flush(timeout_s)
        if left:
            raise SourceError(f"{left} records not confirmed within {timeout_s}s")

    def close(self, timeout_s: float) -> None:
        try:
            self._producer.flush(timeout_s)
        finally:
            self._closed.set()
            self._poller.join(5)


def _offsets(offsets: dict[TopicPartition, int]) -> list[KafkaTP]:
    return [KafkaTP(topic, partition, offset) for (topic, partition), offset in offsets.items()]


def _code(err: KafkaException) -> int | None:
    first = err.args[0] if err.args else None
    return first.code() if isinstance(first, KafkaError) else None


def _commit_failed(err: object, code: int | None) -> bool:
    if code in _REBALANCED:
        log.warning("commit rejected (group rebalanced); events will be redelivered: %s", err)
    else:
        log.warning("commit failed; will retry with the next commit: %s", err)
    return False


def _on_commit(err: KafkaError | None, partitions: list[KafkaTP]) -> None:
    # Called for every commit, synchronous ones too (which report failures themselves).
    if err is not None:
        log.info("commit of %s: %s", sorted((tp.topic, tp.partition) for tp in partitions), err)


def _message_error(err: KafkaError) -> None:
    if err.fatal():
        raise SourceError(f"Kafka consumer failed: {err}")
    if err.code() != KafkaError._PARTITION_EOF and _errors_throttle(("consume", err.code())):
        log.warning("consumer error (the client retries by itself): %s", err)


def _log_error(err: KafkaError) -> None:
    """librdkafka's global errors: transient (broker away, timeouts) unless fatal."""
    if err.fatal():
        log.error("Kafka client fatal error: %s", err)
    elif _errors_throttle(err.code()):
        log.warning("Kafka client (it retries by itself): %s", err)
