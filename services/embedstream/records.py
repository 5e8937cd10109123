"""The record as consumed, before any decoding, and our envelope as a producer writes it:
what every source yields and both decoders (:mod:`embedstream.envelope`,
:mod:`embedstream.cloudevent`) read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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


def encode(
    event_id: str,
    *,
    text: str | None = None,
    model: str | None = None,
    metadata: dict[str, Any] | None = None,
    data_b64: str | None = None,
    uri: str | None = None,
    version: int | None = None,
    op: str | None = None,
) -> bytes:
    """Serialise an envelope (the producer side of :func:`embedstream.envelope.decode`);
    ``op="delete"`` makes a delete."""
    body: dict[str, Any] = {"id": event_id}
    if op is not None:
        body["op"] = op
    if version is not None:
        body["version"] = version
    if text is not None:
        body["text"] = text
    if data_b64 is not None:
        body["data"] = data_b64
    if uri is not None:
        body["uri"] = uri
    if model is not None:
        body["model"] = model
    if metadata:
        body["metadata"] = metadata
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
