"""``embedstream bench --clients``: the ceilings of the Kafka client libraries.

No model runs here. On the embedded broker, each client library produces N
records of each value size to a topic of its own, then consumes a topic
written in full beforehand (the same one for every consumer, so the
consumers compare on the same data); last, our two
:class:`~embedstream.sources.base.Source` implementations poll that topic,
returning :class:`~embedstream.envelope.RawRecord` lists as the worker's
polling thread gets them. The Source rows are what caps the pipeline once the
model is fast: at the GPU target of 20,000 texts/s per GPU, the polling
thread must take records at least that fast and leave CPU for the rest.

- produce: from the first send to the end of ``flush`` (acks=all, linger 5 ms,
  as embedstream's producers use them);
- consume: from the first record returned to the last; every record is
  counted, and the row fails unless all arrived. The libraries' own rows read
  by manual assignment from offset 0 (no group); the Source rows join a
  consumer group as the worker does (the join is outside the clock);
- CPU: this process's CPU time over the same span (all its threads, the
  library's own I/O threads included; the broker is another process).

aiokafka is measured when it is importable; it is not an embedstream
dependency.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import platform
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from embedstream import devstack
from embedstream.errors import BenchError
from embedstream.settings import Settings
from embedstream.sources import kafka as kafka_python_source
from embedstream.sources.base import IgnoreRebalances
from embedstream.sources.registry import kafka_client

log = logging.getLogger(__name__)

SIZES = (200, 1024)
LIBRARIES = ("kafka-python", "confluent-kafka", "aiokafka")
MODULES = {"kafka-python": "kafka", "confluent-kafka": "confluent_kafka", "aiokafka": "aiokafka"}
SOURCES = {"KafkaSource": "kafka-python", "ConfluentSource": "confluent"}
GPU_TARGET_PER_S = 20_000
CPU_PIPELINE_PER_S = 200  # the CPU pipeline's measured rate is ~100-200 texts/s
_BATCH = 512  # records per consumer call, like the worker's max_poll_records


@dataclass(slots=True)
class ClientRow:
    """One measurement: a library (or one of our Sources) doing one operation.

    ``messages`` were produced or consumed in all; the rates count the
    ``timed`` ones over ``seconds`` (a consumer's first batch, which waited for
    the group join, is outside the clock).
    """

    client: str
    op: str
    value_bytes: int
    messages: int
    timed: int
    seconds: float
    cpu_seconds: float
    msg_per_s: float = 0.0
    mb_per_s: float = 0.0
    cpu_us_per_msg: float = 0.0

    def __post_init__(self) -> None:
        seconds = max(self.seconds, 1e-9)
        self.msg_per_s = self.timed / seconds
        self.mb_per_s = self.timed * self.value_bytes / seconds / 1e6
        self.cpu_us_per_msg = 1e6 * self.cpu_seconds / max(self.timed, 1)


@dataclass(slots=True)
class ClientsReport:
    setup: dict[str, Any]
    rows: list[ClientRow]
    unavailable: dict[str, str]

    def table(self) -> str:
        head = ["client", "op", "value B", "messages", "msg/s", "MB/s", "CPU us/msg"]
        cells = [head] + [
            [r.client, r.op, str(r.value_bytes), str(r.messages), f"{r.msg_per_s:,.0f}",
             f"{r.mb_per_s:.1f}", f"{r.cpu_us_per_msg:.1f}"] for r in self.rows
        ] + [[name, why, "-", "-", "-", "-", "-"] for name, why in self.unavailable.items()]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        lines = [" | ".join(c.ljust(w) if i < 2 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                 for row in cells]
        lines.insert(1, "-|-".join("-" * w for w in widths))
        return "\n".join(lines)

    def verdicts(self) -> list[str]:
        """Each consumer against the CPU pipeline's rate and the GPU target."""
        out = []
        for row in self.rows:
            if row.op != "consume":
                continue
            core = GPU_TARGET_PER_S * row.cpu_us_per_msg / 1e6
            out.append(
                f"{row.client} ({row.value_bytes} B): {row.msg_per_s:,.0f} msg/s = "
                f"{row.msg_per_s / CPU_PIPELINE_PER_S:,.0f}x the CPU pipeline, "
                f"{row.msg_per_s / GPU_TARGET_PER_S:.2f}x the {GPU_TARGET_PER_S:,}/s GPU target; "
                f"at {GPU_TARGET_PER_S:,}/s it would use {core:.0%} of a core"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {"setup": self.setup, "rows": [asdict(r) for r in self.rows],
                "unavailable": self.unavailable, "verdicts": self.verdicts()}


def run_clients_command(settings: Settings, args: argparse.Namespace) -> int:
    """``embedstream bench --clients``: measure, print the table, write JSON on request."""
    messages = 2_000 if args.smoke else args.messages
    report = run_clients_bench(settings, messages)
    print(report.table())
    print()
    print("\n".join(report.verdicts()))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


def run_clients_bench(settings: Settings, messages: int) -> ClientsReport:
    if messages < 1:
        raise BenchError("--messages must be at least 1")
    available = {name: importlib.util.find_spec(MODULES[name]) is not None for name in LIBRARIES}
    unavailable = {name: "not installed" for name, ok in available.items() if not ok}
    cfg = devstack.DevStackConfig.on_free_ports(Path(".devstack") / "bench-clients")
    rows: list[ClientRow] = []
    with devstack.embedded_stack(cfg):
        base = settings.model_copy(update={
            "kafka_bootstrap": cfg.bootstrap, "kafka_security_protocol": "PLAINTEXT",
            "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
        })
        for size in SIZES:
            rows += _measure_size(base, size, messages, available)
    setup = {
        "messages": messages, "value_bytes": list(SIZES), "partitions": base.topic_partitions,
        "broker": "embedded (Tansu, in-memory storage, loopback)", "acks": "all",
        "linger_ms": 5, "batch_per_poll": _BATCH, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "versions": _versions(available),
    }
    return ClientsReport(setup, rows, unavailable)


def _measure_size(settings: Settings, size: int, messages: int,
                  available: dict[str, bool]) -> list[ClientRow]:
    payloads = _payloads(size)
    run = uuid.uuid4().hex[:8]
    rows: list[ClientRow] = []
    topics = {}
    for name in (n for n in LIBRARIES if available[n]):
        topic = topics[name] = f"bench.clients.{run}.{size}.{name}"
        kafka_python_source.ensure_topics(settings.kafka, [topic])
        rows.append(_row(name, "produce", size,
                         partial(PRODUCERS[name], settings, topic, payloads, messages)))
        log.info("%s", rows[-1])
    full = topics["kafka-python"]  # one topic read by every consumer
    for name in (n for n in LIBRARIES if available[n]):
        rows.append(_row(name, "consume", size,
                         partial(CONSUMERS[name], settings, full, messages)))
        log.info("%s", rows[-1])
    for source, client in SOURCES.items():
        if client == "confluent" and not available["confluent-kafka"]:
            continue
        rows.append(_row(f"{source}.poll", "consume", size,
                         partial(_consume_source, settings, client, full, messages)))
        log.info("%s", rows[-1])
    return rows


@dataclass(frozen=True, slots=True)
class _Span:
    messages: int
    timed: int
    seconds: float
    cpu_seconds: float


def _row(client: str, op: str, size: int, measure: Callable[[], _Span]) -> ClientRow:
    span = measure()
    return ClientRow(client, op, size, span.messages, span.timed, span.seconds, span.cpu_seconds)


def _payloads(size: int) -> list[bytes]:
    """A few hundred distinct values of ``size`` bytes (text-like, incompressible enough)."""
    out = []
    for i in range(256):
        head = f'{{"id": "bench-{i}", "text": "'.encode()
        body = (os.urandom(size).hex().encode())[: size - len(head) - 2]
        out.append(head + body + b'"}')
    return out


@contextmanager
def _clock() -> Iterator[list[float]]:
    """Wall and CPU seconds of the ``with`` block, appended to the yielded list."""
    spent: list[float] = []
    wall, cpu = time.perf_counter(), time.process_time()
    yield spent
    spent += [time.perf_counter() - wall, time.process_time() - cpu]


# --------------------------------------------------------------------- producers
def _produce_kafka_python(settings: Settings, topic: str, payloads: list[bytes], count: int) -> _Span:
    from kafka import KafkaProducer

    producer = KafkaProducer(**kafka_python_source.client_config(settings.kafka), acks="all", linger_ms=5)
    try:
        with _clock() as spent:
            for i in range(count):
                producer.send(topic, payloads[i % len(payloads)])
            producer.flush()
    finally:
        producer.close()
    return _Span(count, count, spent[0], spent[1])


def _produce_confluent(settings: Settings, topic: str, payloads: list[bytes], count: int) -> _Span:
    from confluent_kafka import Producer

    from embedstream.sources.confluent import client_config

    producer = Producer({**client_config(settings.kafka), "acks": "all", "linger.ms": 5})
    failed: list[object] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(err)

    with _clock() as spent:
        for i in range(count):
            while True:
                try:
                    producer.produce(topic, payloads[i % len(payloads)], on_delivery=delivered)
                    break
                except BufferError:  # local queue full: let deliveries drain it
                    producer.poll(0.05)
            if i % 1000 == 0:
                producer.poll(0)
        left = producer.flush(120)
    if left or failed:
        raise BenchError(f"confluent-kafka: {left} undelivered, {len(failed)} failed: {failed[:3]}")
    return _Span(count, count, spent[0], spent[1])


def _produce_aiokafka(settings: Settings, topic: str, payloads: list[bytes], count: int) -> _Span:
    from aiokafka import AIOKafkaProducer

    async def main() -> list[float]:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                                    linger_ms=5)
        await producer.start()
        try:
            with _clock() as spent:
                for i in range(count):
                    await producer.send(topic, payloads[i % len(payloads)])
                await producer.flush()
        finally:
            await producer.stop()
        return spent

    spent = asyncio.run(main())
    return _Span(count, count, spent[0], spent[1])


PRODUCERS: dict[str, Callable[[Settings, str, list[bytes], int], _Span]] = {
    "kafka-python": _produce_kafka_python,
    "confluent-kafka": _produce_confluent,
    "aiokafka": _produce_aiokafka,
}


# --------------------------------------------------------------------- consumers
def _drain(take: Callable[[int], int], expected: int) -> _Span:
    """Call ``take(most)`` (records taken, at most ``most``) until ``expected`` arrived.

    The clock starts after the first non-empty call (which waited for the
    group join); the records of that call are not counted in the rate.
    Asking for no more than remain keeps a batch call from waiting out its
    timeout for records that will never come.
    """
    limit_s = 60 + expected / 1000
    deadline = time.monotonic() + limit_s
    got = take(min(_BATCH, expected))
    while not got:
        if time.monotonic() > deadline:
            raise BenchError(f"no record arrived within {limit_s:.0f}s")
        got = take(min(_BATCH, expected))
    first = got
    with _clock() as spent:
        while got < expected:
            if time.monotonic() > deadline:
                raise BenchError(f"consumed {got} of {expected} records within {limit_s:.0f}s")
            got += take(min(_BATCH, expected - got))
    if got != expected:
        raise BenchError(f"consumed {got} records, expected {expected}")
    return _Span(got, got - first, spent[0], spent[1])


def _group(name: str) -> str:
    return f"bench-{name}-{uuid.uuid4().hex[:8]}"


def _consume_kafka_python(settings: Settings, topic: str, count: int) -> _Span:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        **kafka_python_source.client_config(settings.kafka), enable_auto_commit=False,
        max_poll_records=_BATCH,
    )
    parts = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
    consumer.assign(parts)
    for tp in parts:
        consumer.seek(tp, 0)
    try:
        return _drain(lambda most: sum(
            len(b) for b in consumer.poll(timeout_ms=100, max_records=most).values()), count)
    finally:
        consumer.close(autocommit=False)


def _consume_confluent(settings: Settings, topic: str, count: int) -> _Span:
    from confluent_kafka import Consumer, TopicPartition

    from embedstream.sources.confluent import client_config

    consumer = Consumer({**client_config(settings.kafka), "group.id": _group("ck"),
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.topic_partitions)])

    def take(most: int) -> int:
        return sum(1 for m in consumer.consume(most, 0.1) if m.error() is None)

    try:
        return _drain(take, count)
    finally:
        consumer.close()


def _consume_aiokafka(settings: Settings, topic: str, count: int) -> _Span:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def open_consumer() -> Any:  # aiokafka works only inside its running loop
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                    enable_auto_commit=False, max_poll_records=_BATCH)
        await consumer.start()
        parts = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        consumer.assign(parts)
        for tp in parts:
            consumer.seek(tp, 0)
        return consumer

    loop = asyncio.new_event_loop()
    try:
        consumer = loop.run_until_complete(open_consumer())

        def take(most: int) -> int:
            batch = loop.run_until_complete(consumer.getmany(timeout_ms=100, max_records=most))
            return sum(len(records) for records in batch.values())

        try:
            return _drain(take, count)
        finally:
            loop.run_until_complete(consumer.stop())
    finally:
        loop.close()


def _consume_source(settings: Settings, client: str, topic: str, count: int) -> _Span:
    """Our Source, as the worker's polling thread uses it: RawRecords per poll."""
    source = kafka_client(client).source(
        settings.model_copy(update={"group_id": _group(client), "max_poll_records": _BATCH}).kafka,
        [topic], IgnoreRebalances(),
    )
    try:
        return _drain(lambda _most: len(source.poll(0.1)), count)
    finally:
        source.close()


CONSUMERS: dict[str, Callable[[Settings, str, int], _Span]] = {
    "kafka-python": _consume_kafka_python,
    "confluent-kafka": _consume_confluent,
    "aiokafka": _consume_aiokafka,
}


def _versions(available: dict[str, bool]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (n for n in LIBRARIES if available[n]):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "?"
    if available["confluent-kafka"]:
        import confluent_kafka

        out["librdkafka"] = confluent_kafka.libversion()[0]
    return out
