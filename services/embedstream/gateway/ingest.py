"""Turning ingest request bodies into Kafka records, validated like the worker does.

Every envelope goes through :func:`embedstream.envelope.decode`, the worker's
own parser, so the gateway accepts exactly what the worker would embed (and
refuses with the same reason codes). A request is all or nothing: one
invalid envelope refuses the whole request and nothing is published.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from embedstream.envelope import RawRecord, decode
from embedstream.errors import EnvelopeError, GatewayError


@dataclass(frozen=True, slots=True)
class Limits:
    max_events: int
    max_event_bytes: int


@dataclass(frozen=True, slots=True)
class Upload:
    """One file of a multipart or raw request."""

    data: bytes
    filename: str | None = None
    content_type: str | None = None


def records_from_json(body: bytes, modality: str, topic: str, limits: Limits,
                      served: dict[str, str]) -> list[tuple[str, bytes]]:
    """A JSON body (one envelope or a list of them) -> ``(id, value)`` records."""
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GatewayError(400, "invalid_json", f"the body is not JSON: {err}") from err
    envelopes = parsed if isinstance(parsed, list) else [parsed]
    if not envelopes:
        raise GatewayError(422, "no_events", "the list of envelopes is empty")
    return validate(envelopes, modality, topic, limits, served)


def records_from_uploads(uploads: list[Upload], modality: str, topic: str, limits: Limits,
                         served: dict[str, str], *, id: str | None, model: str | None,
                         metadata: str | None) -> list[tuple[str, bytes]]:
    """Files (multipart parts or a raw body) -> one envelope each.

    Binary modalities carry the file as ``data`` (base64); a text upload
    becomes the event's ``text`` (UTF-8).
    """
    if not uploads:
        raise GatewayError(422, "no_events", "no file in the request (multipart field 'file')")
    if id is not None and len(uploads) > 1:
        raise GatewayError(422, "invalid_field", "'id' names one event; the request has several")
    meta = _metadata_param(metadata)
    envelopes: list[dict[str, Any]] = []
    for upload in uploads:
        body: dict[str, Any] = {}
        if modality == "text":
            try:
                body["text"] = upload.data.decode("utf-8")
            except UnicodeDecodeError as err:
                raise GatewayError(422, "invalid_utf8", "a text upload must be UTF-8") from err
        else:
            body["data"] = base64.b64encode(upload.data).decode("ascii")
        if id is not None:
            body["id"] = id
        if model is not None:
            body["model"] = model
        if meta:
            body["metadata"] = meta
        envelopes.append(body)
    return validate(envelopes, modality, topic, limits, served)


def validate(envelopes: Iterable[Any], modality: str, topic: str, limits: Limits,
             served: dict[str, str]) -> list[tuple[str, bytes]]:
    """Check each envelope with the worker's rules; give each an id if it has none.

    ``served``: model name -> modality of the models the gateway knows. A named
    model must be one of them when the gateway knows any of ``modality``;
    otherwise the worker decides (and dead-letters an unknown one).
    """
    known = {name for name, kind in served.items() if kind == modality}
    records: list[tuple[str, bytes]] = []
    now_ms = int(time.time() * 1000)
    for index, body in enumerate(envelopes):
        if index >= limits.max_events:
            raise GatewayError(413, "too_many_events",
                               f"more than {limits.max_events} envelopes in one request")
        if isinstance(body, dict) and "tenant" in body:
            raise GatewayError(422, "invalid_field", f"envelope {index}: 'tenant' is not "
                               "yours to set: the API key's tenant is stamped on its events")
        if isinstance(body, dict) and body.get("id") is None:
            body = {**body, "id": uuid.uuid4().hex}
        value = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(value) > limits.max_event_bytes:
            raise GatewayError(413, "payload_too_large",
                               f"envelope {index} is {len(value)} bytes encoded, "
                               f"limit {limits.max_event_bytes}")
        key = str(body["id"]).encode("utf-8") if isinstance(body, dict) else None
        try:
            event = decode(RawRecord(topic, -1, -1, key, value, now_ms), modality,
                           limits.max_event_bytes)
        except EnvelopeError as err:
            raise GatewayError(422, err.reason, f"envelope {index}: {err.detail}") from err
        if event.model is not None and known and event.model not in known:
            raise GatewayError(422, "unknown_model",
                               f"envelope {index}: no {modality} model {event.model!r} here; "
                               f"served: {sorted(known)}")
        records.append((event.id, value))
    return records


def _metadata_param(raw: str | None) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise GatewayError(422, "invalid_field", f"'metadata' is not JSON: {err.msg}") from err
    if not isinstance(parsed, dict):
        raise GatewayError(422, "invalid_field", "'metadata' must be a JSON object")
    return parsed
