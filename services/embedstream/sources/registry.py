"""Kafka client libraries by name. ``KafkaSettings.kafka_client`` picks one.

Each entry builds what embedstream needs from a client library: topic admin,
the consumer (:class:`~embedstream.sources.base.Source`), the dead-letter
producer (:class:`~embedstream.sources.base.DeadLetters`) and the producer
under :class:`embedstream.producer.Producer`
(:class:`~embedstream.sources.base.RecordSender`). A
library is imported only when chosen, so a missing optional one fails with a
:class:`ConfigError` that says what to install, never an ImportError at start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from embedstream.errors import ConfigError
from embedstream.sections import KafkaSettings
from embedstream.sources.base import DeadLetters, RebalanceListener, RecordSender, Source


@dataclass(frozen=True, slots=True)
class KafkaClient:
    """One client library behind the source interfaces."""

    name: str
    ensure_topics: Callable[[KafkaSettings, list[str]], list[str]]
    """Create the missing topics; return those created."""
    source: Callable[[KafkaSettings, list[str], RebalanceListener], Source]
    """A consumer-group member subscribed to the topics."""
    dead_letters: Callable[[KafkaSettings], DeadLetters]
    """The dead-letter producer (to ``settings.topic_dlq``)."""
    sender: Callable[..., RecordSender]
    """``sender(settings, *, connect_timeout_s, max_block_s)``: the producer under
    :class:`embedstream.producer.Producer` (gateway, results stream, ``produce``)."""


def _kafka_python() -> KafkaClient:
    from embedstream.sources import kafka

    return KafkaClient("kafka-python", kafka.ensure_topics, kafka.KafkaSource, kafka.KafkaDeadLetters,
                       kafka.KafkaSender)


def _confluent() -> KafkaClient:
    try:
        from embedstream.sources import confluent
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("confluent_kafka"):
            raise
        raise ConfigError(
            "kafka_client 'confluent' needs the confluent-kafka package: "
            "pip install 'embedstream[confluent]' (or choose kafka_client 'kafka-python')"
        ) from err
    return KafkaClient(
        "confluent", confluent.ensure_topics, confluent.ConfluentSource, confluent.ConfluentDeadLetters,
        confluent.ConfluentSender,
    )


CLIENTS: dict[str, Callable[[], KafkaClient]] = {
    "kafka-python": _kafka_python,
    "confluent": _confluent,
}


def kafka_client(name: str) -> KafkaClient:
    """The client library called ``name`` (imported now); ConfigError if unknown or missing."""
    try:
        factory = CLIENTS[name]
    except KeyError as err:
        raise ConfigError(f"unknown kafka_client {name!r}; known: {sorted(CLIENTS)}") from err
    return factory()
