"""Tenants on the real stack: tenants A (acme) and B (globex) store the same texts under
the same ids through the gateway; A's searches (with any filters, however crafted), id
lookups and deletes never see or touch B's items, and B's never A's."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis
from e2e_support import MODEL, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.commands.search.field import TagField, VectorField
from redis.commands.search.index_definition import IndexDefinition, IndexType

from embedstream.models.manifest import load_manifest
from embedstream.search import search_vector
from embedstream.settings import Settings
from embedstream.sinks.redis import RedisSink, index_name, result_key

TEXTS = {"orbit": "The rocket reached orbit after a flawless launch.",
         "soup": "Simmer the tomato soup for twenty minutes."}
# Filter values that try to end the tag clause and add their own (RediSearch syntax).
CRAFTED = ["en} @tenant:{globex", "en}|@tenant:{globex", "*", "en | globex", "en)|(@tenant:{globex}",
           "\\", "en\\} @tenant:{globex", "}", "{globex}", "en} -@tenant:{acme", "@tenant:{*}",
           "en}) | (@tenant:{globex})=>[KNN 10 @embedding $vec]", "%globex:orbit", "_", "__"]


@pytest.fixture(scope="module")
def docs(scoped_gateway):
    """The same ids and texts stored for both tenants (ids unique to this run)."""
    tag = uuid.uuid4().hex[:6]
    ids = {name: f"{name}-{tag}" for name in TEXTS}
    body = [{"id": ids[n], "text": t, "metadata": {"lang": "en", "year": 2020}}
            for n, t in TEXTS.items()]
    client = scoped_gateway.client
    for tenant in ("tenant-a", "tenant-b"):
        res = client.post("/v1/events/text", json=body, headers=scoped_gateway.as_key(tenant))
        assert res.status_code == 202, res.text
    for tenant in ("tenant-a", "tenant-b"):
        assert wait_for(lambda t=tenant: all(
            lookup(scoped_gateway, t, i).status_code == 200 for i in ids.values()), timeout=60)
    return ids


def lookup(gw, caller: str, event_id: str):
    return gw.client.get(f"/v1/embeddings/{MODEL}/{event_id}", headers=gw.as_key(caller))


def search(gw, caller: str, **body):
    return gw.client.post("/v1/search", json={"text": "rocket launch", "k": 10, **body},
                          headers=gw.as_key(caller))


def tenants_of(res) -> set[str]:
    return {hit["fields"].get("tenant", "") for hit in res.json()["hits"]}


def test_each_tenant_finds_its_own_copy_only(scoped_gateway, docs):
    for caller, tenant in (("tenant-a", "acme"), ("tenant-b", "globex")):
        res = search(scoped_gateway, caller)
        assert res.status_code == 200, res.text
        hits = res.json()["hits"]
        assert {h["id"] for h in hits} >= set(docs.values())
        assert tenants_of(res) == {tenant}
        assert all(f":%{tenant}:" in h["key"] for h in hits)
    everyone = search(scoped_gateway, "all", filters={"lang": "en"}, k=50)
    assert {"acme", "globex"} <= tenants_of(everyone)  # an untenanted key sees every tenant


def test_crafted_filters_cannot_reach_another_tenant(scoped_gateway, docs):
    for value in CRAFTED:
        for filters in ({"lang": value}, {"lang": ["en", value]}):
            res = search(scoped_gateway, "tenant-a", filters=filters)
            assert res.status_code in (200, 400), (value, res.text)
            if res.status_code == 200:
                assert tenants_of(res) <= {"acme"}, value
    unknown = search(scoped_gateway, "tenant-a", filters={"tenant": "globex"})
    assert unknown.status_code == 400  # the tenant is no filter field a request can name


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
       | st.sampled_from(CRAFTED))
def test_no_filter_string_reaches_another_tenant(scoped_gateway, docs, value):
    res = search(scoped_gateway, "tenant-a", filters={"lang": [value, "en"]})
    assert res.status_code in (200, 400), res.text
    if res.status_code == 200:
        assert tenants_of(res) == {"acme"}  # "en" matches A's own; B's never come back


def test_id_lookups_and_search_by_id_stay_in_the_tenant(scoped_gateway, docs):
    a, b = lookup(scoped_gateway, "tenant-a", docs["orbit"]), \
        lookup(scoped_gateway, "tenant-b", docs["orbit"])
    assert a.json()["fields"]["tenant"] == "acme" and b.json()["fields"]["tenant"] == "globex"
    assert a.json()["vector"] == pytest.approx(b.json()["vector"], abs=1e-5)  # same text
    assert lookup(scoped_gateway, "all", docs["orbit"]).status_code == 404  # not untenanted
    by_id = search(scoped_gateway, "tenant-a", text=None, id=docs["orbit"])
    assert by_id.status_code == 200 and tenants_of(by_id) == {"acme"}


def test_a_tenant_deletes_its_own_item_only(scoped_gateway, docs):
    gw = scoped_gateway
    res = gw.client.delete(f"/v1/items/{docs['soup']}?modality=text", headers=gw.as_key("tenant-a"))
    assert res.status_code == 202
    assert wait_for(lambda: lookup(gw, "tenant-a", docs["soup"]).status_code == 404, timeout=60)
    assert lookup(gw, "tenant-b", docs["soup"]).status_code == 200
    assert docs["soup"] in {h["id"] for h in search(gw, "tenant-b", text="tomato soup").json()["hits"]}
    assert docs["soup"] not in {h["id"] for h in
                                search(gw, "tenant-a", text="tomato soup").json()["hits"]}


def test_a_tenant_cannot_write_into_another(scoped_gateway):
    res = scoped_gateway.client.post("/v1/events/text", json={"text": "x", "tenant": "globex"},
                                     headers=scoped_gateway.as_key("tenant-a"))
    assert res.status_code == 422 and "tenant" in res.json()["detail"]


def test_an_index_from_before_tenants_gains_the_tag_and_keeps_its_items(stack, unique, model_root):
    """Upgrade: an index made without the tenant tag gets it at the next start (FT.ALTER);
    items stored before have no tenant: untenanted keys find them, tenants never do."""
    settings = Settings(redis_url=stack.redis_url, key_prefix=unique)
    manifest = load_manifest(model_root / MODEL)
    client = redis.Redis.from_url(stack.redis_url)
    client.ft(index_name(unique, MODEL)).create_index(
        [VectorField("embedding", "HNSW", {"TYPE": "FLOAT32", "DIM": manifest.dimension,
                                           "DISTANCE_METRIC": "COSINE"}), TagField("id")],
        definition=IndexDefinition(prefix=[result_key(unique, MODEL, "")], index_type=IndexType.HASH))
    vector = np.ones(manifest.dimension, dtype="<f4")
    client.hset(result_key(unique, MODEL, "old"), mapping={"id": "old", "embedding": vector.tobytes()})
    RedisSink(settings.redis).prepare([manifest])
    info = client.ft(index_name(unique, MODEL)).info()
    assert any(b"tenant" in attribute or "tenant" in attribute for attribute in info["attributes"])

    def found(tenant: str | None) -> list[str]:
        return [h.id for h in search_vector(client, unique, MODEL, vector, 5, tenant=tenant)]

    assert wait_for(lambda: found(None) == ["old"], timeout=10)
    assert found("acme") == []
