"""CloudEvents in (both Kafka content modes, made with the cloudevents SDK) decode to the
events our envelope describes, with ce id as the id when the envelope has none; bad
CloudEvents are invalid_cloudevent; results records wrapped as CloudEvents parse with the
SDK."""

from __future__ import annotations

import json

import pytest
from cloudevents.v1.http import CloudEvent
from cloudevents.v1.kafka import KafkaMessage, from_binary, from_structured, to_binary, to_structured

from embedstream import cloudevent
from embedstream.envelope import REASONS, RawRecord, decode
from embedstream.errors import EnvelopeError

ATTRS = {"id": "ce-1", "source": "/shop/orders", "type": "com.example.review"}


def record(message: KafkaMessage, topic: str = "t.text", key: bytes | None = None) -> RawRecord:
    value = message.value.encode() if isinstance(message.value, str) else message.value
    return RawRecord(topic, 0, 7, key, value, 1_700_000_000_000,
                     tuple((k, v) for k, v in message.headers.items()))


@pytest.mark.parametrize("mode", [to_binary, to_structured])
def test_envelope_in_either_mode_takes_the_ce_id_when_it_has_none(mode):
    attrs = {**ATTRS, "datacontenttype": "application/json"}  # to_binary needs it
    event = CloudEvent(attrs, {"text": "great shoes", "metadata": {"lang": "en"}})
    decoded = decode(record(mode(event), key=b"the-key"), "text")
    assert (decoded.id, decoded.text, decoded.metadata) == ("ce-1", "great shoes", {"lang": "en"})
    assert decoded.record.headers == record(mode(event)).headers  # the record as consumed
    named = CloudEvent(attrs, {"id": "doc-9", "text": "x"})
    assert decode(record(mode(named)), "text").id == "doc-9"  # the envelope's id wins


def test_spec_structured_mode_and_plain_text_data():
    body = {"specversion": "1.0", **ATTRS, "datacontenttype": "text/plain", "data": "hello"}
    message = KafkaMessage({"content-type": b"application/cloudevents+json"}, None,
                           json.dumps(body).encode())
    assert (decode(record(message), "text").id, decode(record(message), "text").text) == (
        "ce-1", "hello")
    binary = to_binary(CloudEvent({**ATTRS, "datacontenttype": "text/plain"}, "hi there"),
                       data_marshaller=lambda s: s.encode())
    assert decode(record(binary), "text").text == "hi there"


@pytest.mark.parametrize("mode", [to_binary, to_structured])
def test_raw_bytes_for_binary_modalities(mode):
    png = b"\x89PNG\r\n\x1a\n fake"
    event = CloudEvent({**ATTRS, "datacontenttype": "image/png"}, png)
    decoded = decode(record(mode(event, data_marshaller=lambda b: b), topic="t.image"), "image")
    assert (decoded.id, decoded.raw, decoded.content_type) == ("ce-1", png, "image/png")


@pytest.mark.parametrize(("headers", "value"), [
    ({"ce_specversion": b"1.0", "ce_source": b"/s", "ce_type": b"t"}, b'{"text": "x"}'),
    ({"ce_specversion": b"0.3", "ce_id": b"1", "ce_source": b"/s", "ce_type": b"t"},
     b'{"text": "x"}'),
    ({"content-type": b"application/cloudevents+json"}, b'{"specversion": "1.0", "id": "1"}'),
    ({"content-type": b"application/cloudevents+json"},
     b'{"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}'),
    ({"content-type": b"application/cloudevents-batch+json"}, b"[]"),
    ({"content-type": b"application/cloudevents+json"}, b"{not json"),
    ({"ce_specversion": b"1.0", "ce_id": b"1", "ce_source": b"/s", "ce_type": b"t",
      "content-type": b"image/png"}, b"\x89PNG"),
])
def test_bad_cloudevents_are_rejected_with_a_reason(headers, value):
    with pytest.raises(EnvelopeError) as caught:
        decode(record(KafkaMessage(headers, None, value)), "text")
    assert caught.value.reason == "invalid_cloudevent" and caught.value.reason in REASONS


def test_plain_envelopes_are_not_taken_for_cloudevents():
    plain = RawRecord("t.text", 0, 1, None, b'{"text": "x", "metadata": {"specversion": "1"}}', 5)
    assert not cloudevent.is_cloudevent(plain) and decode(plain, "text").id == "t.text:0:1"


@pytest.mark.parametrize("deleted", [False, True])
def test_results_records_parse_with_the_sdk_in_both_modes(deleted):
    body = {"id": "doc-1", "model": "m", "modality": "text", "stored_at": 1.5,
            "source": "t.text:0:7", **({"deleted": True} if deleted else {"dim": 8})}
    kind = "io.embedstream.embedding.deleted" if deleted else "io.embedstream.embedding.stored"
    value = json.dumps(body).encode()
    event = from_binary(KafkaMessage(dict(cloudevent.binary_headers(body)), b"doc-1", value))
    assert (event["id"], event["type"], event["subject"], event.data) == (
        "t.text:0:7/m", kind, "doc-1", body)
    value, headers = cloudevent.structured_value(body)
    event = from_structured(KafkaMessage(dict(headers), b"doc-1", value))
    assert (event["id"], event["source"], event["type"], event.data) == (
        "t.text:0:7/m", "/embedstream/worker", kind, body)
    assert event["time"].startswith("1970-01-01T00:00:01.5")
