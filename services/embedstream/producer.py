"""Publishing events: a small Python API for applications and the produce command.

>>> with Producer(Settings()) as producer:
...     event_id = producer.send_text("hello world", metadata={"lang": "en"})
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from embedstream import envelope
from embedstream.errors import EnvelopeError, SourceError
from embedstream.settings import Settings
from embedstream.sources.kafka import client_config, ensure_topics

log = logging.getLogger(__name__)


class Producer:
    """Sends envelopes to the modality topics. Thread-safe; call :meth:`close` (or use ``with``)."""

    def __init__(self, settings: Settings, *, create_topics: bool = True) -> None:
        self.settings = settings
        if create_topics:
            ensure_topics(settings, [settings.topic_text])
        try:
            self._producer = KafkaProducer(
                **client_config(settings), acks="all", linger_ms=5, retries=10
            )
        except KafkaError as err:
            raise SourceError(f"cannot connect to Kafka at {settings.kafka_bootstrap}: {err}") from err
        self.failed = 0

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_text(
        self,
        text: str,
        *,
        id: str | None = None,
        model: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Queue one text event; return its id. Delivery is confirmed by :meth:`flush`."""
        event_id = id or uuid.uuid4().hex
        value = envelope.encode(event_id, text=text, model=model, metadata=metadata)
        self.send_raw(self.settings.topic_text, event_id, value)
        return event_id

    def send_raw(self, topic: str, key: str | None, value: bytes) -> None:
        """Queue an already-encoded record (the escape hatch for any envelope)."""
        future = self._producer.send(topic, key=key.encode() if key else None, value=value)
        future.add_errback(self._on_error)

    def _on_error(self, err: Exception) -> None:
        self.failed += 1
        log.error("event not delivered: %s", err)

    def flush(self, timeout_s: float = 60.0) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as err:
            raise SourceError(f"events not confirmed within {timeout_s}s: {err}") from err

    def close(self) -> None:
        self._producer.close(timeout=30)


@dataclass(frozen=True, slots=True)
class TextLine:
    """One event to produce, read from a file."""

    id: str | None
    value: bytes


def read_text_events(stream: IO[str]) -> Iterator[TextLine]:
    """Plain lines (one text each) or JSONL envelopes, mixed freely; blank lines skipped.

    A line that starts with ``{`` must be a valid envelope object; a line
    that is not is an error naming its line number (nothing is half-sent
    silently).
    """
    for number, line in enumerate(stream, start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("{"):
            try:
                body = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise EnvelopeError("invalid_json", f"line {number}: {err.msg}") from err
            if not isinstance(body, dict):
                raise EnvelopeError("not_an_object", f"line {number}: not a JSON object")
            event_id = str(body["id"]) if body.get("id") is not None else uuid.uuid4().hex
            body["id"] = event_id
            yield TextLine(event_id, json.dumps(body, ensure_ascii=False).encode("utf-8"))
        else:
            event_id = uuid.uuid4().hex
            yield TextLine(event_id, envelope.encode(event_id, text=stripped))


def produce_lines(producer: Producer, lines: Iterable[TextLine], progress: Any = None) -> int:
    """Send every line to the text topic; return how many were queued."""
    sent = 0
    for line in lines:
        producer.send_raw(producer.settings.topic_text, line.id, line.value)
        sent += 1
        if progress is not None:
            progress.update(1)
    producer.flush()
    return sent
