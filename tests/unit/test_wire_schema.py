"""The wire format's JSON Schema (services/embedstream/data/envelope.schema.json) and the
decoder agree: on generated envelopes, the schema accepts exactly what decode() accepts,
for text topics (the root) and image/audio topics (#/$defs/media). Outside the comparison,
as the schema says: metadata byte sizes, lone surrogates and size limits (generated cases
stay within them)."""

from __future__ import annotations

import json

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from embedstream.envelope import WIRE_SCHEMA, RawRecord, decode
from embedstream.errors import EnvelopeError

TEXT = jsonschema.Draft202012Validator(WIRE_SCHEMA)
MEDIA = jsonschema.Draft202012Validator({**WIRE_SCHEMA, "$ref": "#/$defs/media"})

_chars = st.characters(blacklist_categories=("Cs",))  # no lone surrogates
strings = st.one_of(
    st.text(_chars, max_size=8),
    st.sampled_from(["", " ", "\t\n", "\u0085", "\u00a0x", "a b", "a\x00", "ok", "\u3000",
                     "x" * 513, "\ufeff", "\x7f"]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**53 + 5),
                    st.sampled_from([0.0, 1.0, 2.5, -1.0, 2.0**53]), strings)
values = st.one_of(scalars, st.lists(scalars, max_size=3),
                   st.dictionaries(st.text(max_size=4), scalars, max_size=4))
# Each field: a plausible value 3 times in 4, anything else otherwise, so that valid and
# invalid envelopes are both common.
good = {
    "id": st.sampled_from(["doc-1", 7, None, "a/b:c", "é"]),
    "op": st.sampled_from(["upsert", "delete"]),
    "version": st.sampled_from([0, 12, 2**53 - 1, None]),
    "model": st.sampled_from(["m", None]),
    "metadata": st.sampled_from([{}, {"lang": "en", "n": [1]}, None]),
    "text": st.sampled_from(["hello", " x ", "\u00e9t\u00e9"]),
    "data": st.sampled_from(["aGk=", None]),
    "uri": st.sampled_from(["s3://b/k", None]),
    "extra": values,
}
fields = {name: st.one_of(value, value, value, values) for name, value in good.items()}
envelopes = st.one_of(
    st.fixed_dictionaries({}, optional=fields),
    # near-valid families: one required field right, the rest plausible or not
    st.fixed_dictionaries({"text": good["text"]}, optional={k: v for k, v in good.items()
                                                           if k != "text"}),
    st.fixed_dictionaries({"data": good["data"]}, optional={k: v for k, v in fields.items()
                                                           if k != "data"}),
    st.fixed_dictionaries({"op": st.just("delete")},
                          optional={k: v for k, v in fields.items() if k != "op"}),
)


def accepted(body: object, modality: str) -> bool:
    value = json.dumps(body).encode()
    try:
        decode(RawRecord(f"t.{modality}", 0, 1, None, value, 1000), modality)
    except EnvelopeError:
        return False
    return True


@settings(max_examples=600, deadline=None)
@given(envelopes)
def test_schema_and_decoder_agree_on_text_envelopes(body):
    assert TEXT.is_valid(body) == accepted(body, "text"), body


@settings(max_examples=600, deadline=None)
@given(envelopes)
def test_schema_and_decoder_agree_on_media_envelopes(body):
    assert MEDIA.is_valid(body) == accepted(body, "image"), body


@given(st.one_of(st.lists(values, max_size=2), scalars))
def test_non_objects_are_refused_by_both(body):
    assert not TEXT.is_valid(body) and not accepted(body, "text")


def test_the_examples_of_the_readme_are_valid():
    assert TEXT.is_valid({"id": "doc-1", "text": "hello", "model": "all-minilm-l6-v2",
                          "metadata": {"lang": "en"}})
    assert TEXT.is_valid({"id": "doc-1", "op": "delete"})
    assert MEDIA.is_valid({"id": "img-1", "data": "iVBORw0KGgo="})
    assert not MEDIA.is_valid({"id": "img-1", "data": "iVBORw0KGgo=", "uri": "s3://b/k"})
