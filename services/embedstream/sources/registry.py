"""Kafka client libraries by name. ``KafkaSettings.kafka_client`` picks one.

Each entry builds what embedstream needs from a client library: topic admin,
the consumer (:class:`~embedstream.sources.base.Source`), the dead-letter
producer (:class:`~embedstream.sources.base.DeadLetters`) and the producer
under :class:`embedstream.producer.Producer`
(:class:`~embedstream.sources.base.RecordSender`), and what tools read and
commit with (:class:`~embedstream.sources.base.TopicReader`,
:class:`~embedstream.sources.base.GroupOffsets`). Outside the client bench
(which measures the libraries themselves), nothing else in embedstream builds
a Kafka client, so ``kafka_client`` names the library everywhere. A
library is imported only when chosen, so a missing optional one fails with a
:class:`ConfigError` that says what to install, never an ImportError at start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from embedstream.errors import ConfigError
from embedstream.sections import KafkaSettings
from embedstream.sources.base import (
    DeadLetters,
    GroupOffsets,
    RebalanceListener,
    RecordSender,
    Source,
    TopicReader,
)


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
    """``sender(settings, *, connect_timeout_s, max_block_s, max_record_bytes)``: the
    producer under :class:`embedstream.producer.Producer` (gateway, results stream,
    ``produce``) and ``replay``'s."""
    reader: Callable[..., TopicReader]
    """``reader(settings, *, max_record_bytes)``: reads partitions from chosen offsets,
    outside any group (``replay``, a rollout's backfill bounds)."""
    group_offsets: Callable[[KafkaSettings, str], GroupOffsets]
    """A group's committed offsets, read and written without joining it."""


def _kafka_python() -> KafkaClient:
    from embedstream.sources import kafka

    return KafkaClient("kafka-python", kafka.ensure_topics, kafka.KafkaSource, kafka.KafkaDeadLetters,
                       kafka.KafkaSender, kafka.KafkaTopicReader, kafka.KafkaGroupOffsets)


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
        confluent.ConfluentSender, confluent.ConfluentTopicReader, confluent.ConfluentGroupOffsets,
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
