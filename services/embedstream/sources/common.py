"""What every Kafka client implementation shares, whichever library it wraps.

The SASL settings check, the readiness probe and the dead-letter headers live
here so that kafka-python and confluent-kafka behave alike: same error for
incomplete settings, same "broker reachable" answer, byte-identical headers.
"""

from __future__ import annotations

import socket
import time

from embedstream.envelope import RawRecord
from embedstream.errors import ConfigError
from embedstream.settings import Settings

# Cache of the readiness probe: /readyz may be scraped often, the probe opens sockets.
_PROBE_TTL_S = 2.0


def check_sasl(settings: Settings) -> None:
    """Raise :class:`ConfigError` when a SASL protocol lacks mechanism, user or password."""
    if not settings.kafka_security_protocol.startswith("SASL"):
        return
    if not (settings.kafka_sasl_mechanism and settings.kafka_sasl_username
            and settings.kafka_sasl_password):
        raise ConfigError(
            f"{settings.kafka_security_protocol} needs kafka_sasl_mechanism, "
            "kafka_sasl_username and kafka_sasl_password"
        )


def reachable(server: str, timeout_s: float = 1.0) -> bool:
    """True when ``host:port`` accepts a TCP connection within ``timeout_s``."""
    host, _, port = server.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or server, int(port or 9092)), timeout_s):
            return True
    except (OSError, ValueError):
        return False


class BrokerProbe:
    """Readiness: does any bootstrap broker accept a TCP connection? Cached for 2 s.

    Neither client library offers a public "brokers reachable" call (kafka-python
    drops its bootstrap connection once it has metadata; librdkafka only reports
    errors), so readiness probes the brokers itself, with a short timeout and
    never retrying.
    """

    def __init__(self, servers: list[str]) -> None:
        self._servers = servers
        self._probed: tuple[float, bool] = (-10.0, True)

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._probed[0] >= _PROBE_TTL_S:
            self._probed = (now, any(reachable(server) for server in self._servers))
        return self._probed[1]


def dead_letter_headers(record: RawRecord, reason: str, detail: str) -> list[tuple[str, bytes]]:
    """Headers of a dead letter: reason, detail, source position, then the original headers.

    The record's own ``embedstream.*`` headers are dropped so a re-driven event
    that fails again carries only its latest reason.
    """
    return [
        ("embedstream.reason", reason.encode()),
        ("embedstream.error", detail[:1000].encode("utf-8", "replace")),
        ("embedstream.source.topic", record.topic.encode()),
        ("embedstream.source.partition", str(record.partition).encode()),
        ("embedstream.source.offset", str(record.offset).encode()),
        ("embedstream.failed_at", str(int(time.time() * 1000)).encode()),
        *[(k, v) for k, v in record.headers if not k.startswith("embedstream.")],
    ]
