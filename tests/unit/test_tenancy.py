"""Tenants on the wire and in the store's keys: a record names its tenant only where the
deployment allows it, and two tenants' ids can never share a key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedstream.envelope import HEADER_TENANT, RawRecord, decode
from embedstream.errors import EnvelopeError
from embedstream.search import TagFilter, filter_expression
from embedstream.sinks.layout import id_of_segment, key_segment, result_key, tombstone_key
from embedstream.sources.common import dead_letter


def record(value: bytes | None, tenant: bytes | None = None, key: bytes | None = b"d1"):
    headers = ((HEADER_TENANT, tenant),) if tenant is not None else ()
    return RawRecord("t", 0, 7, key, value, 1000, headers)


def test_a_header_names_the_tenant_only_where_allowed():
    upsert, tombstone = record(b'{"text": "hi"}', b"acme"), record(None, b"acme")
    for raw in (upsert, tombstone):
        assert decode(raw, "text", tenant_from="header").tenant == "acme"
        assert decode(raw, "text", tenant_from="envelope").tenant == "acme"
        with pytest.raises(EnvelopeError, match="tenant_from=none"):
            decode(raw, "text")
    assert decode(record(b'{"text": "hi"}'), "text", tenant_from="header").tenant is None


def test_the_envelope_names_the_tenant_only_in_envelope_mode():
    body = b'{"text": "hi", "tenant": "acme"}'
    assert decode(record(body), "text", tenant_from="envelope").tenant == "acme"
    with pytest.raises(EnvelopeError, match=r"name it in header embedstream\.tenant"):
        decode(record(body), "text", tenant_from="header")
    with pytest.raises(EnvelopeError, match="different tenants"):
        decode(record(body, b"globex"), "text", tenant_from="envelope")


@pytest.mark.parametrize("tenant", [b"", b"1acme", b"a" * 65, b"ac me", b"a}b", b"\xff"])
def test_bad_tenant_names_are_refused(tenant):
    with pytest.raises(EnvelopeError) as err:
        decode(record(b'{"text": "hi"}', tenant), "text", tenant_from="header")
    assert err.value.reason == "invalid_field"


tenants = st.none() | st.from_regex(r"\A[A-Za-z][A-Za-z0-9_.-]{0,10}\Z")
ids = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)


@given(tenants, ids, tenants, ids)
def test_tenants_ids_never_share_a_key(tenant_a, id_a, tenant_b, id_b):
    key_a, key_b = result_key("p", "m", id_a, 0, tenant_a), result_key("p", "m", id_b, 0, tenant_b)
    assert (key_a == key_b) == ((tenant_a, id_a) == (tenant_b, id_b))
    assert (tombstone_key("p", "m", id_a, tenant_a) == tombstone_key("p", "m", id_b, tenant_b)) \
        == ((tenant_a, id_a) == (tenant_b, id_b))
    assert id_of_segment(key_segment(id_a, tenant_a)) == id_a


def _unescape(escaped: str) -> str:
    """A tag value back from its escaped form; fails on an unescaped special character."""
    out, i = [], 0
    while i < len(escaped):
        if escaped[i] == "\\":
            out.append(escaped[i + 1])
            i += 2
            continue
        assert escaped[i].isascii() and (escaped[i].isalnum() or escaped[i] == "_"), escaped
        out.append(escaped[i])
        i += 1
    return "".join(out)


@given(st.text(min_size=1, max_size=30))
def test_a_filter_value_cannot_leave_its_clause(value):
    expression = filter_expression([TagFilter("lang", (value,))], tenant="acme")
    head = "(@tenant:{acme} @meta_lang:{"
    assert expression.startswith(head) and expression.endswith("})")
    assert _unescape(expression[len(head):-2]) == value


def test_a_dead_letter_keeps_the_events_tenant_and_drops_an_earlier_letters_headers():
    failed_before = [("embedstream.reason", b"model_error"), ("embedstream.redriven_from", b"x"),
                     (HEADER_TENANT, b"acme"), ("embedstream.model", b"m")]
    letter = dead_letter(RawRecord("t", 0, 7, b"d1", b"{bad", 1000, tuple(failed_before)),
                         "invalid_json", "bad", 1_000_000)
    headers = [(k, v) for k, v in letter.headers]
    assert (HEADER_TENANT, b"acme") in headers and ("embedstream.model", b"m") in headers
    assert dict(headers)["embedstream.reason"] == b"invalid_json"
    assert [k for k, _ in headers].count("embedstream.reason") == 1
    assert "embedstream.redriven_from" not in dict(headers)
