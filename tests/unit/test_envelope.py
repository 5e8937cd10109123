import json

import pytest

from embedstream.envelope import REASONS, RawRecord, decode, encode, stable_id
from embedstream.errors import EnvelopeError


def record(value: bytes | None, key: bytes | None = None, offset: int = 7) -> RawRecord:
    return RawRecord("embedstream.text", 2, offset, key, value, 1_700_000_000_000)


def test_round_trip_keeps_every_field():
    value = encode("doc-1", text="héllo wörld", model="m1", metadata={"lang": "de", "n": 3})
    event = decode(record(value), "text")
    assert (event.id, event.text, event.model) == ("doc-1", "héllo wörld", "m1")
    assert event.metadata == {"lang": "de", "n": "3"}


def test_id_falls_back_to_key_then_position():
    body = json.dumps({"text": "x"}).encode()
    assert decode(record(body, key=b"key-9"), "text").id == "key-9"
    assert decode(record(body), "text").id == "embedstream.text:2:7"
    assert stable_id(record(body)) == "embedstream.text:2:7"


def test_integer_id_is_accepted_as_string():
    assert decode(record(b'{"id": 42, "text": "x"}'), "text").id == "42"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe not utf8", "invalid_utf8"),
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (None, "invalid_json"),
        (b'["a list"]', "not_an_object"),
        (b'{"id": "a"}', "missing_text"),
        (b'{"id": "a", "text": "   "}', "empty_text"),
        (b'{"id": "a", "text": 5}', "invalid_field"),
        (b'{"id": "a b", "text": "x"}', "invalid_field"),
        (b'{"id": true, "text": "x"}', "invalid_field"),
        (b'{"id": "a", "text": "x", "metadata": [1]}', "invalid_field"),
        (b'{"id": "a", "text": "x", "metadata": {"embedding": "x"}}', "invalid_field"),
        (b'{"id": "a", "text": "x", "model": 3}', "invalid_field"),
    ],
)
def test_bad_events_have_a_stable_reason(value, reason):
    with pytest.raises(EnvelopeError) as info:
        decode(record(value), "text")
    assert info.value.reason == reason
    assert info.value.reason in REASONS


def test_payload_limit():
    with pytest.raises(EnvelopeError) as info:
        decode(record(encode("a", text="x" * 100)), "text", max_bytes=50)
    assert info.value.reason == "payload_too_large"


def test_binary_envelope_leaves_room_for_data_and_uri():
    event = decode(record(b'{"id": "i", "data": "aGk=", "uri": "file:///x.png"}'), "image")
    assert (event.data_b64, event.uri, event.text) == ("aGk=", "file:///x.png", None)
