"""What every Kafka client implementation shares, whichever library it wraps.

The SASL settings check, the readiness probe and the dead-letter headers live
here so that kafka-python and confluent-kafka behave alike: same error for
incomplete settings, same "broker reachable" answer, byte-identical headers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from dataclasses import dataclass

from embedstream.envelope import RawRecord
from embedstream.errors import ConfigError
from embedstream.sections import KafkaSettings

# Room left in a dead letter for the record framing a producer adds around key, value
# and headers (a few dozen bytes per record and per header; generous on purpose).
_LETTER_MARGIN = 8 << 10
# Bytes of the original value a reference letter carries, to recognise it by.
_PREFIX_BYTES = 512
# A reference letter keeps the original key and headers only while they are this small.
_KEEP_KEY_BYTES = 4 << 10
_KEEP_HEADER_BYTES = 16 << 10
HEADER_VALUE_KIND = "embedstream.value"
"""Dead-letter header: ``original`` (the value is the record's own) or ``reference``
(the record was too large to copy; the value is a JSON reference to it)."""

# Cache of the readiness probe: /readyz may be scraped often, the probe opens sockets.
_PROBE_TTL_S = 2.0


def check_sasl(settings: KafkaSettings) -> None:
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


LETTER_HEADERS = frozenset({
    "embedstream.reason", "embedstream.error", "embedstream.source.topic",
    "embedstream.source.partition", "embedstream.source.offset", "embedstream.failed_at",
    HEADER_VALUE_KIND, "embedstream.redriven_from",
})
"""Headers about a dead letter or a re-drive, not about the event: the event's own
(``embedstream.id``, ``.model``, ``.metadata`` of the raw-bytes form, ``.tenant``)
travel with it through the dead-letter topic and back."""


def dead_letter_headers(record: RawRecord, reason: str, detail: str) -> list[tuple[str, bytes]]:
    """Headers of a dead letter: reason, detail, source position, then the original headers.

    An earlier letter's headers (:data:`LETTER_HEADERS`) are dropped so a re-driven
    event that fails again carries only its latest reason; the event's own headers
    (its tenant among them) are kept.
    """
    return [*_own_headers(record, reason, detail), *_original_headers(record)]


def _own_headers(record: RawRecord, reason: str, detail: str) -> list[tuple[str, bytes]]:
    return [
        ("embedstream.reason", reason.encode()),
        ("embedstream.error", detail[:1000].encode("utf-8", "replace")),
        ("embedstream.source.topic", record.topic.encode()),
        ("embedstream.source.partition", str(record.partition).encode()),
        ("embedstream.source.offset", str(record.offset).encode()),
        ("embedstream.failed_at", str(int(time.time() * 1000)).encode()),
    ]


def _original_headers(record: RawRecord) -> list[tuple[str, bytes]]:
    return [(k, v) for k, v in record.headers if k not in LETTER_HEADERS]


@dataclass(frozen=True, slots=True)
class Letter:
    """A dead letter as produced: what the record's key, value and headers become."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    reference: bool


def dead_letter(
    record: RawRecord, reason: str, detail: str, max_bytes: int, *, minimal: bool = False
) -> Letter:
    """The dead letter of ``record``, sized to fit a producer limited to ``max_bytes``.

    A letter carries the original key, value and headers untouched when they fit;
    otherwise (or with ``minimal``, after a producer refused the letter for its
    size anyway) its value is a JSON reference to the original instead: source
    topic, partition and offset, sizes, the SHA-256 and the first bytes of the
    value, marked ``embedstream.value: reference``. The original then stays
    readable at its source position for as long as the topic retains it.
    """
    own = _own_headers(record, reason, detail)
    original = _original_headers(record)
    value = record.value or b""
    headers = [*own, (HEADER_VALUE_KIND, b"original"), *original]
    if not minimal and _size(record.key, value, headers) <= max_bytes - _LETTER_MARGIN:
        return Letter(record.key, value, headers, reference=False)
    key = record.key if record.key is not None and len(record.key) <= _KEEP_KEY_BYTES else None
    keep_headers = not minimal and _size(None, b"", original) <= _KEEP_HEADER_BYTES
    body = {
        "reference": "embedstream.dead-letter/1",
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp_ms,
        "value_bytes": len(value),
        "value_sha256": hashlib.sha256(value).hexdigest(),
        "value_prefix_b64": base64.b64encode(value[:_PREFIX_BYTES]).decode("ascii"),
        "key_bytes": None if record.key is None else len(record.key),
        "key_kept": key is not None or record.key is None,
        "headers": len(original),
        "headers_kept": keep_headers,
    }
    if record.key is not None and key is None:
        body["key_sha256"] = hashlib.sha256(record.key).hexdigest()
    headers = [*own, (HEADER_VALUE_KIND, b"reference"), *(original if keep_headers else [])]
    return Letter(key, json.dumps(body, separators=(",", ":")).encode(), headers, reference=True)


def _size(key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> int:
    return (len(key or b"") + len(value)
            + sum(len(k.encode("utf-8", "replace")) + len(v or b"") + 16 for k, v in headers))
