"""The wire format: Kafka records in, validated events out.

A record's value is a JSON envelope::

    {"id": "doc-1", "text": "hello", "model": "all-minilm-l6-v2",
     "metadata": {"lang": "en"}}

Binary modalities use ``data`` (base64) or ``uri`` in place of ``text``.
``id`` falls back to the record key, then to ``<topic>:<partition>:<offset>``,
which is stable across redeliveries, so replays overwrite rather than
duplicate. ``version`` (an integer, default the record timestamp) orders
updates of one id: an older version never overwrites a newer one. Metadata
names are the producer's own (``source``, ``model``, ``id`` included): they
are stored apart from the system's fields and come back unchanged.

Deletes: a tombstone (the record key is the id, the value null), the way
compacted topics and CDC tools delete, or an envelope ``{"id": ..., "op":
"delete"}`` for producers that cannot send a null value. Their version is the
envelope's ``version`` or the record timestamp, like an upsert's.

Every way an event can be bad maps to one reason code in :data:`REASONS`; the
worker sends such events to the dead-letter topic.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from embedstream import cloudevent
from embedstream.errors import EnvelopeError

# (most callers take RawRecord, header, encode and HEADER_CONTENT_TYPE from here too)
from embedstream.records import HEADER_CONTENT_TYPE, RawRecord, header
from embedstream.records import encode as encode  # re-exported: the producer side of decode

# The closed set of reasons an event is rejected for. They label the failure
# counter and the dead-letter header, so keep the set small and stable.
REASONS = (
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "invalid_field",
    "missing_text",
    "empty_text",
    "unknown_model",
    "payload_too_large",
    "model_error",
    "text_too_long",
    # binary payloads (image and audio events)
    "missing_data",
    "invalid_base64",
    "uri_forbidden",
    "uri_unreachable",
    "unsupported_format",
    "invalid_image",
    "image_too_large",
    "invalid_audio",
    "audio_empty",
    "audio_too_long",
    # metadata over metadata_max_fields / metadata_max_bytes
    "metadata_too_large",
    # the store refused this item's write (a data error, not an outage)
    "store_rejected",
    # worker processes died repeatedly with this record in flight; not processed again
    "poison_quarantined",
    # anything else that went wrong with this one record (exception type and message in
    # the dead letter's embedstream.error header)
    "internal_error",
    # a CloudEvent (ce_* headers or application/cloudevents+json) that breaks the spec
    "invalid_cloudevent",
)

# The raw-bytes form: the record value is the file itself and these headers
# carry what the JSON envelope would. A record is in this form when its
# ``content-type`` header is present and is not JSON.
HEADER_ID = "embedstream.id"
HEADER_MODEL = "embedstream.model"
HEADER_METADATA = "embedstream.metadata"
HEADER_TENANT = "embedstream.tenant"
"""The tenant of a record (read where ``Settings.tenant_from`` allows it)."""
TENANT_SOURCES = ("none", "header", "envelope")
TENANT_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
"""Tenant names: a letter, then letters, digits, ``_ . -``; at most 64 characters."""

# The wire format's JSON Schema (shipped with the package; users validate envelopes in their
# own language with it): the id rule, the text rule, the operations and the version range
# come from it, so the schema and this decoder cannot drift apart (tests/unit/test_wire_schema.py
# checks them against each other on generated envelopes).
WIRE_SCHEMA: dict[str, Any] = json.loads(
    resources.files("embedstream").joinpath("data/envelope.schema.json").read_text("utf-8"))
_DEFS = WIRE_SCHEMA["$defs"]
MAX_ID_LENGTH: int = _DEFS["id"]["maxLength"]
ID_PATTERN: str = _DEFS["id"]["pattern"]
NOT_BLANK: str = _DEFS["textValue"]["pattern"]
OPS = (_DEFS["upsert"]["properties"]["op"]["const"], _DEFS["delete"]["properties"]["op"]["const"])
_MAX_VERSION: int = _DEFS["version"]["maximum"]
_ID = re.compile(ID_PATTERN)
_NOT_BLANK = re.compile(NOT_BLANK)
# A JSON escape of a UTF-16 surrogate (\ud800 to \udfff). Alone it decodes to a str that
# is not valid Unicode text: tokenizers refuse it, Redis clients cannot encode it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
@dataclass(frozen=True, slots=True)
class MetadataLimits:
    """Bounds on an event's metadata, checked at decode time (``metadata_too_large``).

    Metadata becomes hash fields in the store: these keep one event from writing
    thousands of fields or megabytes of them.
    """

    max_fields: int = 256
    max_bytes: int = 64 << 10
    """UTF-8 bytes of every name and (serialised) value together."""


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event, ready for its model's preprocessing."""

    id: str
    modality: str
    model: str | None
    text: str | None
    metadata: dict[str, Any]
    """The producer's metadata, as sent (JSON values)."""
    record: RawRecord
    data_b64: str | None = None
    uri: str | None = None
    version: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = None
    """The file's bytes, for a record in the raw-bytes form."""
    content_type: str | None = None
    op: str = "upsert"
    """``delete``: remove every chunk of ``id`` (a tombstone or ``"op": "delete"``)."""
    tenant: str | None = None
    """The tenant the event belongs to (None: none), where the deployment lets records
    name one (``Settings.tenant_from``). A system field, never the producer's metadata."""

    @property
    def deletes(self) -> bool:
        return self.op == "delete"


def stable_id(record: RawRecord) -> str:
    """The id of an event that names none: the record's position, stable on replay."""
    return f"{record.topic}:{record.partition}:{record.offset}"


def decode(
    record: RawRecord,
    modality: str,
    max_bytes: int = 1 << 20,
    metadata_limits: MetadataLimits | None = None,
    tenant_from: str = "none",
) -> Event:
    """Parse and validate a record of ``modality``. Raises :class:`EnvelopeError`.

    ``tenant_from`` (``Settings.tenant_from``) says where the record may name its
    tenant; a record naming one elsewhere is refused (``invalid_field``).

    Text events are JSON envelopes. Image and audio events are JSON envelopes
    with ``data`` (base64) or ``uri``, or records in the raw-bytes form
    (see :data:`HEADER_CONTENT_TYPE`). Every string that can reach the model or
    the store is valid Unicode text when this returns. A CloudEvent (either
    content mode, see :mod:`embedstream.cloudevent`) is decoded from the record
    it unwraps to; the event keeps the record as consumed.
    """
    if cloudevent.is_cloudevent(record):
        native = cloudevent.unwrap(record, modality)
        return replace(decode(native, modality, max_bytes, metadata_limits, tenant_from),
                       record=record)
    limits = metadata_limits or MetadataLimits()
    if record.value is None:
        return replace(_tombstone(record, modality), tenant=tenant_of({}, record, tenant_from))
    value = record.value
    if modality != "text" and _is_raw(record):
        event = _decode_raw(record, modality, max_bytes, limits)
        return replace(event, tenant=tenant_of({}, record, tenant_from))
    if len(value) > max_bytes:
        raise EnvelopeError(
            "payload_too_large", f"value is {len(value)} bytes, limit {max_bytes}"
        )
    body = _parse_object(value, "value")
    strict = _SURROGATE_ESCAPE.search(value) is not None

    event_id = _event_id(body, record)
    model = _optional_str(body, "model")
    version = _version(body, record)
    tenant = tenant_of(body, record, tenant_from)
    op = body.get("op", "upsert")
    if op not in OPS:
        raise EnvelopeError("invalid_field", f"'op' must be one of {OPS}")
    if op == "delete":
        if strict:
            _check_unicode({"id": event_id, "model": model})
        return Event(id=event_id, modality=modality, model=model, text=None, metadata={},
                     record=record, version=version, op="delete", tenant=tenant)
    metadata = _metadata(body, limits)
    data_b64 = _optional_str(body, "data")
    uri = _optional_str(body, "uri")
    text = body.get("text")
    if modality == "text":
        if text is None:
            raise EnvelopeError("missing_text", "a text event needs a 'text' field")
        if not isinstance(text, str):
            raise EnvelopeError("invalid_field", f"'text' is a {type(text).__name__}, not a string")
        if not _NOT_BLANK.search(text):
            raise EnvelopeError("empty_text", "'text' is empty")
    if strict:
        _check_unicode({"id": event_id, "model": model, "text": text, "data": data_b64,
                        "uri": uri, **_metadata_strings(flat_metadata(metadata))})
    if modality != "text":
        if data_b64 is None and uri is None:
            raise EnvelopeError("missing_data", f"an {modality} event needs 'data' or 'uri'")
        if data_b64 is not None and uri is not None:
            raise EnvelopeError("invalid_field", "give 'data' or 'uri', not both")
    return Event(
        id=event_id,
        modality=modality,
        model=model,
        text=text if isinstance(text, str) else None,
        metadata=metadata,
        record=record,
        data_b64=data_b64,
        uri=uri,
        version=version,
        tenant=tenant,
    )


def tenant_of(body: dict[str, Any], record: RawRecord, tenant_from: str) -> str | None:
    """The tenant a record names (header ``embedstream.tenant``, or the envelope's
    ``tenant`` where ``tenant_from`` is ``envelope``), or None.

    Naming a tenant where the deployment does not allow it is refused, never
    ignored: an event silently stored without its tenant would be visible to
    every untenanted key, and one stored under the wrong one to another tenant.
    """
    raw_header = header(record, HEADER_TENANT)
    in_body = body.get("tenant")
    if raw_header is None and in_body is None:
        return None
    if tenant_from == "none":
        where = "the envelope's 'tenant'" if in_body is not None else f"header {HEADER_TENANT}"
        raise EnvelopeError("invalid_field", f"{where} is not accepted: this deployment does "
                            "not let records name a tenant (tenant_from=none)")
    if in_body is not None and tenant_from != "envelope":
        raise EnvelopeError("invalid_field", f"the envelope's 'tenant' is not accepted "
                            f"(tenant_from={tenant_from}): name it in header {HEADER_TENANT}")
    from_header = None
    if raw_header is not None:
        try:
            from_header = raw_header.decode("utf-8")
        except UnicodeDecodeError as err:
            raise EnvelopeError("invalid_field", f"header {HEADER_TENANT} is not UTF-8") from err
    if from_header is not None and in_body is not None and from_header != in_body:
        raise EnvelopeError("invalid_field", f"header {HEADER_TENANT} and the envelope's "
                            "'tenant' name different tenants")
    tenant = from_header if from_header is not None else in_body
    return check_tenant(tenant)


def check_tenant(tenant: object) -> str:
    """``tenant`` if it is a valid tenant name; :class:`EnvelopeError` if not."""
    if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
        raise EnvelopeError("invalid_field", "a tenant is a letter, then up to 63 letters, "
                            "digits or '_.-'")
    return tenant


def _tombstone(record: RawRecord, modality: str) -> Event:
    """A null value: delete the record key's id (a tombstone needs a key)."""
    if not record.key:
        raise EnvelopeError("invalid_field", "a tombstone (null value) needs the id as its key")
    return Event(id=_event_id({}, record), modality=modality, model=None, text=None, metadata={},
                 record=record, version=_version({}, record), op="delete")


def _parse_object(value: bytes, what: str) -> dict[str, Any]:
    """``value`` as a JSON object, or the :class:`EnvelopeError` that says why not."""
    try:
        text_value = value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EnvelopeError("invalid_utf8", f"{what} is not UTF-8: {err}") from err
    try:
        body = json.loads(text_value)
    except json.JSONDecodeError as err:
        raise EnvelopeError("invalid_json", f"{what} is not JSON: {err.msg} at {err.pos}") from err
    except RecursionError as err:
        raise EnvelopeError("invalid_json", f"{what} is nested too deeply to parse") from err
    except ValueError as err:  # e.g. an integer literal over Python's digit limit
        raise EnvelopeError("invalid_json", f"{what} is not usable JSON: {err}") from err
    if not isinstance(body, dict):
        raise EnvelopeError("not_an_object", f"envelope is a JSON {type(body).__name__}")
    return body


def _metadata_strings(metadata: dict[str, str]) -> dict[str, str]:
    """Every metadata name and value, labelled for :func:`_check_unicode`'s message."""
    out: dict[str, str] = {}
    for index, (name, value) in enumerate(metadata.items()):
        out[f"metadata field name #{index}"] = name
        out[f"metadata field #{index}"] = value
    return out


def _check_unicode(fields: dict[str, Any]) -> None:
    """Raise ``invalid_field`` for the first string holding a lone surrogate."""
    for name, value in fields.items():
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise EnvelopeError(
                "invalid_field",
                f"{name} holds a lone UTF-16 surrogate (U+{ord(value[err.start]):04X}) at "
                f"character {err.start}: not valid Unicode text",
            ) from err


def _version(body: dict[str, Any], record: RawRecord) -> int:
    """The event's version: ``version`` if given, else the record's timestamp (ms).

    The sink never overwrites a stored embedding with an older version, so a
    replay of old records cannot undo newer ones.
    """
    raw = _integral(body.get("version"))
    if raw is None:
        return max(0, record.timestamp_ms)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= _MAX_VERSION:
        raise EnvelopeError("invalid_field", "'version' must be an integer in [0, 2^53)")
    return raw


def _integral(value: Any) -> Any:
    """A float with an integral value as an int (JSON has one number type: 3.0 is 3)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
def _is_raw(record: RawRecord) -> bool:
    content_type = header(record, HEADER_CONTENT_TYPE)
    return content_type is not None and not content_type.lower().startswith(b"application/json")


def _decode_raw(
    record: RawRecord, modality: str, max_bytes: int, limits: MetadataLimits
) -> Event:
    """A raw-bytes record: the value is the file; id, model, metadata come from headers."""
    value = record.value or b""
    if len(value) > max_bytes:
        raise EnvelopeError("payload_too_large", f"value is {len(value)} bytes, limit {max_bytes}")
    if not value:
        raise EnvelopeError("missing_data", "the raw-bytes record has an empty value")
    try:
        fields = {
            name: raw.decode("utf-8")
            for name, raw in (
                ("id", header(record, HEADER_ID)),
                ("model", header(record, HEADER_MODEL)),
                ("metadata", header(record, HEADER_METADATA)),
                ("content_type", header(record, HEADER_CONTENT_TYPE)),
            )
            if raw is not None
        }
    except UnicodeDecodeError as err:
        raise EnvelopeError("invalid_utf8", f"a header is not UTF-8: {err}") from err
    raw_metadata = header(record, HEADER_METADATA)
    metadata = (
        _parse_object(raw_metadata, HEADER_METADATA) if raw_metadata is not None else None
    )
    body: dict[str, Any] = {"id": fields.get("id"), "model": fields.get("model"),
                            "metadata": metadata}
    parsed = _metadata(body, limits)
    if raw_metadata is not None and _SURROGATE_ESCAPE.search(raw_metadata):
        _check_unicode(_metadata_strings(flat_metadata(parsed)))
    return Event(
        id=_event_id(body, record),
        modality=modality,
        model=_optional_str(body, "model"),
        text=None,
        metadata=parsed,
        record=record,
        raw=value,
        content_type=fields.get("content_type"),
        version=_version({}, record),
    )


def _event_id(body: dict[str, Any], record: RawRecord) -> str:
    raw = _integral(body.get("id"))
    if raw is None:
        if record.key:
            try:
                raw = record.key.decode("utf-8")
            except UnicodeDecodeError as err:
                raise EnvelopeError("invalid_field", "record key is not UTF-8") from err
        else:
            return stable_id(record)
    if isinstance(raw, bool) or not isinstance(raw, str | int):
        raise EnvelopeError("invalid_field", f"'id' must be a string, not {type(raw).__name__}")
    return check_id(str(raw))


def check_id(event_id: str) -> str:
    """``event_id`` if it is a valid id; :class:`EnvelopeError` (``invalid_field``) if not."""
    if not event_id or len(event_id) > MAX_ID_LENGTH:
        raise EnvelopeError("invalid_field", f"'id' must be 1..{MAX_ID_LENGTH} characters")
    if not _ID.search(event_id):
        raise EnvelopeError("invalid_field", "'id' must not contain whitespace or control chars")
    return event_id


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise EnvelopeError("invalid_field", f"'{name}' must be a non-empty string")
    return value


def _metadata(body: dict[str, Any], limits: MetadataLimits) -> dict[str, Any]:
    """The producer's metadata object, as sent, within its limits. Any names: the sink
    keeps them apart from its own fields."""
    raw = body.get("metadata")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise EnvelopeError("invalid_field", "'metadata' must be a JSON object")
    if len(raw) > limits.max_fields:
        raise EnvelopeError(
            "metadata_too_large", f"metadata has {len(raw)} fields, limit {limits.max_fields}"
        )
    try:
        size = len(json.dumps(raw, ensure_ascii=False, separators=(",", ":")))
    except (RecursionError, ValueError) as err:
        raise EnvelopeError("metadata_too_large", "metadata is nested too deeply") from err
    # Characters bound bytes from below; exact UTF-8 sizes only near the limit.
    if size > limits.max_bytes or (size * 4 > limits.max_bytes and _utf8_size(raw) > limits.max_bytes):
        raise EnvelopeError("metadata_too_large", f"metadata is over {limits.max_bytes} bytes")
    return raw


def _utf8_size(value: dict[str, Any]) -> int:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return len(text.encode("utf-8", "surrogatepass"))


def flat_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """Each top-level metadata field as a string: strings as they are, anything else as
    JSON (what becomes a hash field, and what a search filter compares)."""
    return {
        name: value if isinstance(value, str)
        else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        for name, value in metadata.items()
    }
