"""The record as consumed, before any decoding: what every source yields and every
decoder (:mod:`embedstream.envelope`, :mod:`embedstream.cloudevent`) reads."""

from __future__ import annotations

from dataclasses import dataclass

# A record whose ``content-type`` header is present and not JSON is in the raw-bytes
# form (the value is the file itself); CloudEvents name their data's type with it too.
HEADER_CONTENT_TYPE = "content-type"


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A record as consumed, independent of the Kafka client that fetched it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()


def header(record: RawRecord, name: str) -> bytes | None:
    """The last value of header ``name`` (case-insensitive), or None."""
    found = None
    for key, value in record.headers:
        if key.lower() == name:
            found = value
    return found
