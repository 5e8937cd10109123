"""Property-based tests of the envelope parser: any bytes in, a clear outcome out.

Whatever a producer sends, ``decode`` returns a valid event or raises an
``EnvelopeError`` with a known reason: never another exception, never a hang.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from embedstream.envelope import REASONS, RawRecord, decode, encode
from embedstream.errors import EnvelopeError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


def record(value: bytes | None, key: bytes | None = None) -> RawRecord:
    return RawRecord("topic", 0, 5, key, value, 1_000)


@settings(max_examples=400, deadline=None)
@given(value=st.binary(max_size=300), key=st.none() | st.binary(max_size=20),
       modality=st.sampled_from(["text", "image", "audio"]))
def test_arbitrary_bytes_never_escape_as_another_error(value, key, modality):
    try:
        event = decode(record(value, key), modality)
    except EnvelopeError as err:
        assert err.reason in REASONS
    else:
        assert event.id
        if modality == "text":
            assert event.text and event.text.strip()


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(
    st.sampled_from(["id", "text", "model", "metadata", "data", "uri", "version", "other"]),
    json_values, max_size=6))
def test_arbitrary_json_objects_are_accepted_or_rejected_with_a_reason(body):
    try:
        event = decode(record(json.dumps(body).encode()), "text")
    except EnvelopeError as err:
        assert err.reason in REASONS
    else:
        assert isinstance(event.text, str) and event.text.strip()
        assert isinstance(event.metadata, dict)
        assert 0 <= event.version < 2**53


@settings(max_examples=300, deadline=None)
@given(
    event_id=st.text(min_size=1, max_size=40).filter(
        lambda s: not any(c.isspace() or ord(c) < 32 for c in s)),
    text=st.text(min_size=1).filter(str.strip),
    metadata=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    version=st.none() | st.integers(min_value=0, max_value=2**53 - 1),
)
def test_encode_decode_round_trip(event_id, text, metadata, version):
    event = decode(record(encode(event_id, text=text, metadata=metadata, version=version)), "text")
    assert (event.id, event.text, event.metadata) == (event_id, text, metadata)
    assert event.version == (1_000 if version is None else version)
