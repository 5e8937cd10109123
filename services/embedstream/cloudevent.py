"""CloudEvents over Kafka (the CNCF spec's Kafka protocol binding), in and out.

In: :func:`unwrap` turns a record carrying a CloudEvent into the record our
decoder reads natively (:mod:`embedstream.envelope`), so every rule of the
wire format (ids, versions, metadata, limits, reasons) applies unchanged:

* **Binary mode**: a ``ce_specversion`` header. The value is the event's data:
  our JSON envelope (``content-type`` absent, ``application/json`` or
  ``*+json``); for text topics a ``text/*`` value is the text itself; for image
  and audio topics any other ``content-type`` makes the value the file's raw
  bytes (the raw-bytes form).
* **Structured mode**: ``content-type: application/cloudevents+json``, or a JSON
  value with ``specversion`` at the top (the Python SDK's ``to_structured``
  puts the data's content type in the header instead). ``data`` holds our
  envelope (a JSON object), or the text (a string, text topics), or
  ``data_base64`` the file's bytes (image and audio topics).

The CloudEvent's ``id`` is the event id when the envelope names none (before
the record key). A CloudEvent missing ``specversion`` 1.0, ``id``, ``source``
or ``type``, or one in batch mode, is an ``invalid_cloudevent``
:class:`~embedstream.errors.EnvelopeError`: a dead letter with that reason.

Out: :func:`binary_headers` and :func:`structured_value` wrap a results record
as a CloudEvent (setting ``results_cloudevents``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import replace
from typing import Any

from embedstream.errors import EnvelopeError
from embedstream.records import HEADER_CONTENT_TYPE, RawRecord, encode, header

SPECVERSION = "1.0"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
SOURCE = "/embedstream/worker"
TYPE_STORED = "io.embedstream.embedding.stored"
TYPE_DELETED = "io.embedstream.embedding.deleted"
_REQUIRED = ("id", "source", "type")


def is_cloudevent(record: RawRecord) -> bool:
    """True when ``record`` carries a CloudEvent in either content mode (cheap check)."""
    return header(record, "ce_specversion") is not None or _is_structured(record)


def is_structured(record: RawRecord) -> bool:
    return header(record, "ce_specversion") is None and _is_structured(record)


def _is_structured(record: RawRecord) -> bool:
    ctype = (header(record, HEADER_CONTENT_TYPE) or b"").lower()
    if ctype.startswith(b"application/cloudevents"):
        return True
    value = record.value
    # The SDK's structured records: a JSON object with specversion, whatever the header.
    return value is not None and value.lstrip()[:1] == b"{" and _has_specversion(value)


def _has_specversion(value: bytes) -> bool:
    if b'"specversion"' not in value:
        return False
    try:
        body = json.loads(value)
    except (ValueError, RecursionError):
        return False
    return isinstance(body, dict) and "specversion" in body


def unwrap(record: RawRecord, modality: str) -> RawRecord:
    """The record in our native form (see the module docstring), or ``record`` itself
    when it is no CloudEvent. Raises :class:`EnvelopeError` (``invalid_cloudevent``)."""
    if header(record, "ce_specversion") is not None:
        return _binary(record, modality)
    if _is_structured(record):
        return _structured(record, modality)
    return record


def _invalid(detail: str) -> EnvelopeError:
    return EnvelopeError("invalid_cloudevent", detail)


def _attributes(attrs: dict[str, Any]) -> str:
    """Check the required context attributes; return the id."""
    if attrs.get("specversion") != SPECVERSION:
        raise _invalid(f"specversion must be {SPECVERSION!r}, got {attrs.get('specversion')!r}")
    for name in _REQUIRED:
        value = attrs.get(name)
        if not isinstance(value, str) or not value:
            raise _invalid(f"the required attribute {name!r} is missing or empty")
    return str(attrs["id"])


def _binary(record: RawRecord, modality: str) -> RawRecord:
    try:
        attrs = {name[3:].lower(): value.decode("utf-8") for name, value in record.headers
                 if name.lower().startswith("ce_")}
    except UnicodeDecodeError as err:
        raise _invalid("a ce_ header is not UTF-8") from err
    event_id = _attributes(attrs)
    ctype = (header(record, HEADER_CONTENT_TYPE) or b"application/json").decode("latin-1").lower()
    others = tuple((k, v) for k, v in record.headers if not k.lower().startswith("ce_"))
    if record.value is None:  # a tombstone keeps its key, or takes the event id
        return replace(record, key=record.key or event_id.encode("utf-8"), headers=others)
    return _native(record, modality, event_id, ctype, record.value, others)


def _native(record: RawRecord, modality: str, event_id: str, ctype: str, data: bytes,
            others: tuple[tuple[str, bytes], ...]) -> RawRecord:
    """``data`` of content type ``ctype`` as a native record keyed by the event id."""
    key = event_id.encode("utf-8")
    plain = tuple((k, v) for k, v in others if k.lower() != HEADER_CONTENT_TYPE)
    if _is_json(ctype):
        return replace(record, key=key, value=data, headers=plain)
    if ctype.startswith("text/") and modality == "text":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise EnvelopeError("invalid_utf8", f"the text is not UTF-8: {err}") from err
        return replace(record, key=key, value=encode(event_id, text=text), headers=plain)
    if modality == "text":
        raise _invalid(f"a text event's data must be JSON or text/*, not {ctype!r}")
    return replace(record, key=key, value=data,
                   headers=(*plain, (HEADER_CONTENT_TYPE, ctype.encode("utf-8"))))


def _is_json(ctype: str) -> bool:
    base = ctype.split(";", 1)[0].strip()
    return base == "application/json" or base.endswith("+json")


def _structured(record: RawRecord, modality: str) -> RawRecord:
    header_type = (header(record, HEADER_CONTENT_TYPE) or b"").decode("latin-1").lower()
    if header_type.startswith(BATCH):
        raise _invalid("batch mode is not part of the Kafka binding: send one event per record")
    if record.value is None:
        raise _invalid("a structured CloudEvent needs a value")
    try:
        body = json.loads(record.value)
    except (ValueError, RecursionError) as err:
        raise _invalid(f"the structured event is not JSON: {err}") from err
    if not isinstance(body, dict):
        raise _invalid("the structured event is not a JSON object")
    event_id = _attributes(body)
    ctype = body.get("datacontenttype")
    if not isinstance(ctype, str) or not ctype:
        # The Python SDK moves datacontenttype to the header; the spec keeps it in the body.
        ctype = header_type if header_type and not header_type.startswith(STRUCTURED) \
            else "application/json"
    ctype = ctype.lower()
    others = tuple((k, v) for k, v in record.headers if k.lower() != HEADER_CONTENT_TYPE)
    if "data_base64" in body:
        try:
            data = base64.b64decode(str(body["data_base64"]), validate=True)
        except (binascii.Error, ValueError) as err:
            raise EnvelopeError("invalid_base64", "data_base64 is not base64") from err
        return _native(record, modality, event_id, ctype, data, others)
    if "data" not in body:
        raise _invalid("the event has neither 'data' nor 'data_base64'")
    data_value = body["data"]
    if isinstance(data_value, dict):
        raw = json.dumps(data_value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return _native(record, modality, event_id, "application/json", raw, others)
    if isinstance(data_value, str) and modality == "text" and not _is_json(ctype):
        return _native(record, modality, event_id, "text/plain", data_value.encode("utf-8"), others)
    raise _invalid("'data' must be our envelope (a JSON object)"
                   + (" or the text (a string)" if modality == "text" else
                      ", or 'data_base64' the file's bytes"))


# ----------------------------------------------------------------- out
def attributes(body: dict[str, Any]) -> dict[str, str]:
    """The context attributes of a results record's CloudEvent."""
    stored_at = float(body.get("stored_at") or 0.0)
    return {
        "specversion": SPECVERSION,
        "id": f"{body['source']}/{body['model']}",
        "source": SOURCE,
        "type": TYPE_DELETED if body.get("deleted") else TYPE_STORED,
        "subject": str(body["id"]),
        "time": dt.datetime.fromtimestamp(stored_at, dt.UTC).isoformat().replace("+00:00", "Z"),
    }


def binary_headers(body: dict[str, Any]) -> list[tuple[str, bytes]]:
    """Binary mode: ``ce_*`` headers and ``content-type``; the value stays the body."""
    return [("content-type", b"application/json"),
            *((f"ce_{name}", value.encode("utf-8")) for name, value in attributes(body).items())]


def structured_value(body: dict[str, Any]) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Structured mode: the whole event as JSON, and its ``content-type`` header."""
    event = {**attributes(body), "datacontenttype": "application/json", "data": body}
    value = json.dumps(event, separators=(",", ":")).encode("utf-8")
    return value, [("content-type", STRUCTURED.encode("ascii"))]
