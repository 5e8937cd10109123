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
    assert event.metadata == {"lang": "de", "n": 3}  # as sent: the producer's own JSON values


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
        (None, "invalid_field"),  # a tombstone without a key: no id to delete
        (b'["a list"]', "not_an_object"),
        (b'{"id": "a"}', "missing_text"),
        (b'{"id": "a", "text": "   "}', "empty_text"),
        (b'{"id": "a", "text": 5}', "invalid_field"),
        (b'{"id": "a b", "text": "x"}', "invalid_field"),
        (b'{"id": true, "text": "x"}', "invalid_field"),
        (b'{"id": "a", "text": "x", "metadata": [1]}', "invalid_field"),
        (b'{"id": "a", "op": "upsert-please", "text": "x"}', "invalid_field"),
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


def test_binary_envelope_carries_data_or_uri():
    event = decode(record(b'{"id": "i", "data": "aGk="}'), "image")
    assert (event.data_b64, event.uri, event.text) == ("aGk=", None, None)
    event = decode(record(b'{"id": "i", "uri": "file:///x.png"}'), "audio")
    assert (event.data_b64, event.uri) == (None, "file:///x.png")
    for body, reason in ((b'{"id": "i", "data": "aGk=", "uri": "file:///x.png"}', "invalid_field"),
                         (b'{"id": "i"}', "missing_data")):
        with pytest.raises(EnvelopeError) as info:
            decode(record(body), "image")
        assert info.value.reason == reason


def test_raw_bytes_form_takes_id_model_metadata_from_headers():
    raw = RawRecord("embedstream.image", 0, 3, None, b"\x89PNG...", 0, (
        ("content-type", b"image/png"), ("embedstream.id", b"img-1"),
        ("embedstream.model", b"m"), ("embedstream.metadata", b'{"k": 1}'),
    ))
    event = decode(raw, "image")
    assert (event.id, event.model, event.raw, event.metadata) == ("img-1", "m", b"\x89PNG...", {"k": 1})
    assert event.content_type == "image/png"
    assert decode(RawRecord("embedstream.image", 0, 4, None, b"x", 0,
                            (("content-type", b"audio/wav"),)), "audio").id == "embedstream.image:0:4"


def test_text_that_is_not_valid_unicode_is_refused_in_every_field():
    """JSON escapes of lone surrogates decode to strings tokenizers and Redis clients refuse:
    refused at decode time, whichever field holds one (names of metadata fields too)."""
    import pytest

    from embedstream.envelope import RawRecord, decode
    from embedstream.errors import EnvelopeError

    for body in (b'{"text": "a\\ud800"}', b'{"id": "x\\udfff", "text": "a"}',
                 b'{"text": "a", "metadata": {"k": "v\\udbff"}}',
                 b'{"text": "a", "metadata": {"k\\udfff": "v"}}'):
        with pytest.raises(EnvelopeError) as caught:
            decode(RawRecord("t", 0, 1, None, body, 1), "text")
        assert caught.value.reason == "invalid_field" and "surrogate" in caught.value.detail
    ok = decode(RawRecord("t", 0, 1, None, b'{"text": "\\ud83d\\ude00", "metadata": {"\\u00e9": "x"}}', 1),
                "text")
    assert ok.text == "\U0001f600" and ok.metadata == {"é": "x"}
