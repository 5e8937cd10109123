"""The gateway against the real broker, worker and Redis: ingest over HTTP, the
worker stores it, search finds it, the results stream announces it; bad requests
get clear 4xx answers and nothing reaches Kafka."""

from __future__ import annotations

import asyncio
import json
import uuid

import numpy as np
import pytest
from e2e_support import partition_ends, wait_for
from kafka import KafkaConsumer

import embedstream
from embedstream.errors import Backpressure
from embedstream.gateway.app import create_app
from embedstream.gateway.publisher import KafkaEventPublisher
from embedstream.producer import Producer
from embedstream.runtime.loader import load_models
from embedstream.settings import Settings

MODEL = "all-minilm-l6-v2"
DOCS = {
    "rocket": ("The rocket reached orbit after a flawless launch.", "en", 2019),
    "satellite": ("A communications satellite raised its orbit.", "en", 2005),
    "fusee": ("La fusée a atteint son orbite.", "fr", 2021),
    "soup": ("Simmer the tomato soup for twenty minutes.", "en", 2012),
}


def stored(client, event_id: str) -> bool:
    return client.get(f"/v1/embeddings/{MODEL}/{event_id}").status_code == 200


@pytest.fixture(scope="module")
def docs(gateway):
    """DOCS ingested through the gateway (ids made unique) and stored by the worker."""
    tag = uuid.uuid4().hex[:6]
    ids = {name: f"{name}-{tag}" for name in DOCS}
    with gateway.client() as client:
        res = client.post("/v1/events/text", json=[
            {"id": ids[n], "text": t, "metadata": {"lang": lang, "year": year, "batch": tag}}
            for n, (t, lang, year) in DOCS.items()
        ])
        assert res.status_code == 202, res.text
        assert res.json()["ids"] == list(ids.values())
        assert wait_for(lambda: all(stored(client, i) for i in ids.values()), timeout=60)
    return ids


def test_ingested_events_are_searchable(gateway, docs, model_root):
    with gateway.client() as client:
        res = client.post("/v1/search", json={"text": "spacecraft in orbit", "k": 2})
        assert res.status_code == 200, res.text
        hits = res.json()["hits"]
        assert {h["id"] for h in hits} == {docs["rocket"], docs["satellite"]}
        assert hits[0]["score"] >= hits[1]["score"] > 0.3
        assert hits[0]["text"] in (DOCS["rocket"][0], DOCS["satellite"][0])
        assert hits[0]["chunk"] == 0 and hits[0]["chunks"] == 1

        # Filters: a tag and a numeric range, as a hybrid KNN query.
        res = client.post("/v1/search", json={"text": "spacecraft in orbit", "k": 5,
                                              "filters": {"lang": "en", "year": {"gte": 2010}}})
        assert [h["id"] for h in res.json()["hits"]][:2] == [docs["rocket"], docs["soup"]]
        assert all(h["metadata"]["lang"] == "en" and h["metadata"]["year"] >= 2010
                   for h in res.json()["hits"])
        res = client.post("/v1/search", json={"text": "orbit", "filters": {"lang": ["fr"]}})
        assert [h["id"] for h in res.json()["hits"]] == [docs["fusee"]]

        # By stored id: its neighbours, itself excluded.
        res = client.post("/v1/search", json={"id": docs["rocket"], "k": 1})
        assert [h["id"] for h in res.json()["hits"]] == [docs["satellite"]]

        # The stored vector is the model's embedding of the text.
        res = client.get(f"/v1/embeddings/{MODEL}/{docs['soup']}")
        body = res.json()
        assert body["dim"] == 384 and body["metadata"]["lang"] == "en"
        model = load_models(model_root, [MODEL], providers=[], threads=1)[MODEL]
        expected = model.embed_texts([DOCS["soup"][0]])[0]
        assert float(np.asarray(body["vector"]) @ expected) > 0.9999

        # Clear 4xx for what cannot be searched.
        assert client.get(f"/v1/embeddings/{MODEL}/nope").status_code == 404
        assert client.get("/v1/embeddings/nope/x").json()["error"] == "unknown_model"
        res = client.post("/v1/search", json={"text": "x", "filters": {"tenant": "a"}})
        assert res.status_code == 400 and "not an indexed field" in res.json()["detail"]
        res = client.post("/v1/search", files={"file": ("a.png", b"\x89PNG", "image/png")})
        assert res.status_code == 404 and res.json()["error"] == "no_model"


def test_results_stream_announces_stored_events(gateway, docs):
    consumer = KafkaConsumer(gateway.settings.topic_results,
                             bootstrap_servers=gateway.settings.kafka_bootstrap,
                             auto_offset_reset="earliest", group_id=None, consumer_timeout_ms=5000)
    seen = {}
    for record in consumer:
        body = json.loads(record.value)
        seen[body["id"]] = (record.key.decode(), body)
        if set(docs.values()) <= set(seen):
            break
    consumer.close()
    key, body = seen[docs["rocket"]]
    assert key == docs["rocket"]
    assert body["model"] == MODEL and body["dim"] == 384 and body["modality"] == "text"
    assert body["key"] == f"{gateway.settings.key_prefix}:{MODEL}:{docs['rocket']}"
    assert body["source"].startswith(gateway.settings.topic_text + ":")


def test_bad_requests_get_4xx_and_nothing_reaches_kafka(gateway):
    settings = gateway.settings
    before = partition_ends(settings.kafka_bootstrap, settings.topic_text, 4)
    url = "/v1/events/text"
    with gateway.client() as client:
        cases = [
            (client.post(url, content=b"x" * (9 << 20),
                         headers={"Content-Type": "application/json"}), 413, "too_large"),
            (client.post(url, content=b'{"text": "unclosed',
                         headers={"Content-Type": "application/json"}), 400, "invalid_json"),
            (client.post(url, json=[{"text": "fine"}, {"text": ""}]), 422, "empty_text"),
            (client.post(url, json={"text": "x", "model": "no-such-model"}), 422, "unknown_model"),
            (client.post(url, content=b"<e/>", headers={"Content-Type": "application/xml"}),
             415, "unsupported_media_type"),
            (client.post(url, json={"text": "x"}, headers={"X-API-Key": "wrong"}),
             401, "unauthorized"),
        ]
        for res, status, code in cases:
            assert (res.status_code, res.json()["error"]) == (status, code), res.text
        assert client.post(url, json={"text": "x"}, headers={"X-API-Key": ""}).status_code == 401
    assert partition_ends(settings.kafka_bootstrap, settings.topic_text, 4) == before


def test_python_clients_produce_search_and_get(gateway, docs):
    with embedstream.Client(gateway.url, api_key=gateway.api_key) as es:
        [event_id] = es.produce("text", {"text": "A kitten naps on the windowsill.",
                                         "metadata": {"lang": "en", "year": 2024}})
        assert wait_for(lambda: event_id in {h.id for h in es.search(text="sleeping cat", k=3)},
                        timeout=60)
        stored_item = es.get(MODEL, event_id)
        assert len(stored_item.vector) == 384 and stored_item.metadata["year"] == 2024
        with pytest.raises(embedstream.EmbedstreamError, match="empty_text"):
            es.produce("text", [{"text": ""}])

    async def run() -> list[str]:
        async with embedstream.AsyncClient(gateway.url, api_key=gateway.api_key) as es:
            hits = await es.search(text="rocket launch", k=1, filters={"lang": "en"})
            got = await es.get(MODEL, docs["rocket"])
            assert got.fields["text"] == DOCS["rocket"][0]
            return [h.id for h in hits]

    assert asyncio.run(run()) == [docs["rocket"]]


def test_unreachable_broker_is_429_with_retry_after():
    from fastapi.testclient import TestClient

    from embedstream.devstack import free_port

    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", gateway_search=False,
                        gateway_retry_after_s=7)
    publisher = KafkaEventPublisher(settings.kafka, settings.gateway)
    with TestClient(create_app(settings, publisher)) as client:
        res = client.post("/v1/events/text", json={"text": "x"})
        assert res.status_code == 429 and res.headers["Retry-After"] == "7"
        assert "not connected to Kafka" in res.json()["detail"]
        assert client.get("/readyz").json()["checks"] == {"broker": False}


def test_full_producer_buffer_is_backpressure(gateway):
    with Producer(gateway.settings.kafka, buffer_bytes=1000, topics=[gateway.settings.topic_dlq]) as p:
        p.publish(gateway.settings.topic_dlq, [("a", b"x" * 500)], timeout_s=30)
        assert p.pending_bytes == 0  # confirmed: the reservation is released
        with pytest.raises(Backpressure) as err:
            p.publish(gateway.settings.topic_dlq, [("a", b"x" * 600), ("b", b"y" * 600)],
                      timeout_s=30, retry_after_s=4)
        assert err.value.retry_after_s == 4


def test_gateway_runtime_imports_no_torch(gateway):
    import subprocess
    import sys
    code = f"""
import sys
from embedstream.settings import Settings
from embedstream.gateway import build_searcher
from embedstream.gateway.app import create_app
from embedstream.testing import MemoryPublisher
settings = Settings(model_dir={str(gateway.settings.model_dir)!r}, redis_url={gateway.settings.redis_url!r})
create_app(settings, MemoryPublisher(), build_searcher(settings))
import embedstream.client
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers',
               'sentence_transformers'))
print('HEAVY', heavy)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
