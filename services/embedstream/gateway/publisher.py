"""Where the gateway's events go: the modality topics, through the package's Producer.

The gateway starts whether or not the broker answers: a background thread
connects (and reconnects after a failed start), and until it has, every
publish raises :class:`~embedstream.errors.Backpressure` (answered 429 with
``Retry-After``), readiness is false, and nothing is queued.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from embedstream.errors import Backpressure, Cancelled, SourceError
from embedstream.retry import Backoff, retry
from embedstream.sections import GatewaySettings, KafkaSettings
from embedstream.settings import MODALITIES

log = logging.getLogger(__name__)

_RECONNECT = Backoff(initial_s=1.0, max_s=30.0)


class EventPublisher(Protocol):
    def publish(self, topic: str, records: Sequence[tuple[str | None, bytes | None]],
                headers: Sequence[tuple[str, bytes]] = ()) -> None:
        """Publish (every record with ``headers``) and wait for the broker's confirmation,
        or raise :class:`Backpressure` (retry later) / :class:`SourceError` (refused)."""
        ...

    def ready(self) -> bool:
        """True when publishing can succeed now (connected)."""
        ...

    def close(self) -> None: ...


class KafkaEventPublisher:
    """See :class:`EventPublisher`; connects on a background thread."""

    def __init__(self, kafka: KafkaSettings, gateway: GatewaySettings) -> None:
        from embedstream.producer import Producer

        self._kafka = kafka
        self._settings = gateway
        self._producer: Producer | None = None
        self._last_ok = False  # the last publish (or the connect) succeeded
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._connect, name="gateway-kafka", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        from embedstream.producer import Producer

        kafka, settings = self._kafka, self._settings

        def connect() -> Producer:
            return Producer(
                kafka,
                topics=[kafka.topic_for(m) for m in MODALITIES],
                buffer_bytes=settings.gateway_buffer_bytes,
                connect_timeout_s=5.0,
                # send() blocks for topic metadata at most this long when the broker is away
                max_block_s=min(5.0, settings.gateway_publish_timeout_s),
            )

        def on_retry(err: BaseException, delay: float) -> None:
            log.warning("Kafka not reachable yet (%s); retrying in %.0fs", err, delay)

        try:
            self._producer = retry(connect, transient=(SourceError,), backoff=_RECONNECT,
                                   cancel=self._closed, on_retry=on_retry)
        except Cancelled:
            return
        self._last_ok = True
        log.info("gateway connected to Kafka at %s", kafka.kafka_bootstrap)

    def publish(self, topic: str, records: Sequence[tuple[str | None, bytes | None]],
                headers: Sequence[tuple[str, bytes]] = ()) -> None:
        producer = self._producer
        retry = float(self._settings.gateway_retry_after_s)
        if producer is None:
            raise Backpressure(f"not connected to Kafka at {self._kafka.kafka_bootstrap}", retry)
        try:
            producer.publish(
                topic, records, timeout_s=self._settings.gateway_publish_timeout_s,
                retry_after_s=retry, headers=[list(headers)] * len(records) if headers else None,
            )
        except Backpressure:
            self._last_ok = False
            raise
        self._last_ok = True

    def ready(self) -> bool:
        """Connected, and the last publish was confirmed (a timed-out one makes it
        false until the next confirmed one)."""
        return self._producer is not None and self._last_ok

    def close(self) -> None:
        self._closed.set()
        if self._producer is not None:
            self._producer.close()
