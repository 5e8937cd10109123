"""The ecosystem's protocols against the real gateway, worker, broker and Redis: the
official openai client on /v1/embeddings, CloudEvents in (both Kafka content modes, made
with the SDK) and out (results parsed with the SDK), and the framework recipes of the
README (RedisVL, LangChain) over the index the worker wrote."""

from __future__ import annotations

import json
import uuid

import numpy as np
import openai
import pytest
from cloudevents.v1.http import CloudEvent
from cloudevents.v1.kafka import KafkaMessage, from_binary, to_binary, to_structured
from e2e_support import wait_for
from kafka import KafkaConsumer

from embedstream.producer import Producer
from embedstream.sinks.layout import result_key

MODEL = "all-minilm-l6-v2"
# Topics and tags of their own: the gateway (and its index) is shared with
# test_gateway_api.py, whose searches must not meet these documents.
DOCS = {
    "violin": ("The violinist tuned her instrument before the concert.", "de", 2019),
    "piano": ("A grand piano filled the concert hall with music.", "de", 2005),
    "garden": ("The gardener planted tomatoes in spring.", "it", 2021),
    "bread": ("Knead the dough and let the bread rise overnight.", "de", 2012),
}


def stored(client, event_id: str) -> bool:
    return client.get(f"/v1/embeddings/{MODEL}/{event_id}").status_code == 200


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def docs(gateway):
    """DOCS ingested through the gateway with metadata, stored by the worker."""
    tag = uuid.uuid4().hex[:6]
    ids = {name: f"eco-{name}-{tag}" for name in DOCS}
    with gateway.client() as client:
        res = client.post("/v1/events/text", json=[
            {"id": ids[n], "text": t, "metadata": {"lang": lang, "year": year}}
            for n, (t, lang, year) in DOCS.items()])
        assert res.status_code == 202, res.text
        assert wait_for(lambda: all(stored(client, i) for i in ids.values()), timeout=60)
    return ids


@pytest.fixture(scope="module")
def oai(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.api_key, max_retries=0)


def test_openai_client_gets_the_stored_vectors_and_sentence_transformers(gateway, docs, oai):
    from sentence_transformers import SentenceTransformer

    from embedstream.export import default_text_checkpoint

    texts = [DOCS[name][0] for name in DOCS]
    floats = oai.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    b64 = oai.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    assert floats.model == MODEL and [d.index for d in floats.data] == [0, 1, 2, 3]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > len(texts)
    reference = SentenceTransformer(str(default_text_checkpoint()), device="cpu").encode(texts)
    with gateway.client() as client:
        for name, got, got64, ref in zip(DOCS, floats.data, b64.data, reference, strict=True):
            vector = client.get(f"/v1/embeddings/{MODEL}/{docs[name]}").json()["vector"]
            assert len(got.embedding) == 384
            assert cosine(got.embedding, vector) >= 0.9999
            assert cosine(got.embedding, ref) >= 0.9999
            assert np.allclose(got.embedding, got64.embedding, atol=1e-7)


def test_openai_client_sees_openai_errors(gateway, oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.embeddings.create(model=MODEL, input=[[101, 2023, 102]])
    assert caught.value.code == "token_ids_not_supported"
    assert "check_embedding_ctx_length" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        oai.embeddings.create(model=MODEL, input="x", dimensions=128)
    assert caught.value.code == "invalid_value" and caught.value.param == "dimensions"
    with pytest.raises(openai.NotFoundError) as caught:
        oai.embeddings.create(model="text-embedding-3-small", input="x")
    assert caught.value.code == "unknown_model" and MODEL in caught.value.message
    wrong = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model=MODEL, input="x")


def test_cloudevents_in_both_modes_are_stored_with_their_ids_and_announced(gateway):
    settings = gateway.settings
    tag = uuid.uuid4().hex[:6]
    attrs = {"source": "/tests/ecosystem", "type": "com.example.note",
             "datacontenttype": "application/json"}
    binary = to_binary(CloudEvent({**attrs, "id": f"ce-bin-{tag}"}, {"text": "a binary note"}))
    structured = to_structured(CloudEvent({**attrs, "id": f"ce-str-{tag}"},
                                          {"text": "a structured note"}))
    spec = KafkaMessage({"content-type": b"application/cloudevents+json"}, None, json.dumps(
        {"specversion": "1.0", **attrs, "id": f"ce-spec-{tag}", "data": {"text": "spec"}}).encode())
    bad = KafkaMessage({"ce_specversion": b"1.0", "ce_source": b"/s", "ce_type": b"t"}, None,
                       b'{"text": "no id"}')
    with Producer(settings.kafka, topics=[settings.topic_text]) as producer:
        for message in (binary, structured, spec, bad):
            producer.send_raw(settings.topic_text, None, message.value,
                              list(message.headers.items()))
        producer.flush()
    ids = [f"ce-bin-{tag}", f"ce-str-{tag}", f"ce-spec-{tag}"]
    with gateway.client() as client:
        assert wait_for(lambda: all(stored(client, i) for i in ids), timeout=60)
        fields = client.get(f"/v1/embeddings/{MODEL}/{ids[1]}").json()["fields"]
        assert fields["text"] == "a structured note"
    consumer = KafkaConsumer(settings.topic_results, bootstrap_servers=settings.kafka_bootstrap,
                             auto_offset_reset="earliest", group_id=None, consumer_timeout_ms=5000)
    events = {}
    for record in consumer:
        event = from_binary(KafkaMessage(dict(record.headers), record.key, record.value))
        events[event["subject"]] = event
        if set(ids) <= set(events):
            break
    consumer.close()
    event = events[ids[0]]
    assert event["type"] == "io.embedstream.embedding.stored" and event["specversion"] == "1.0"
    assert event.data["id"] == ids[0] and event.data["model"] == MODEL
    assert event["id"] == f"{event.data['source']}/{MODEL}"
    dlq = KafkaConsumer(settings.topic_dlq, bootstrap_servers=settings.kafka_bootstrap,
                        auto_offset_reset="earliest", group_id=None, consumer_timeout_ms=5000)
    reasons = [dict(r.headers).get("embedstream.reason") for r in dlq
               if r.value == b'{"text": "no id"}']
    dlq.close()
    assert reasons == [b"invalid_cloudevent"]


def test_redisvl_recipe(gateway, docs, oai):
    from redisvl.index import SearchIndex
    from redisvl.query import VectorQuery
    from redisvl.query.filter import Num, Tag

    prefix = gateway.settings.key_prefix
    index = SearchIndex.from_existing(f"{prefix}:idx:{MODEL}",
                                      redis_url=gateway.settings.redis_url)
    query_vector = oai.embeddings.create(model=MODEL, input="classical music performance",
                                         encoding_format="float").data[0].embedding
    query = VectorQuery(query_vector, "embedding", return_fields=["id", "text", "meta_year"],
                        num_results=2,
                        filter_expression=(Tag("meta_lang") == "de") & (Num("meta_year") >= 2000))
    hits = index.query(query)
    # RedisVL's "id" is the hash's key (<prefix>:<model>:<id>, see sinks/layout.py)
    assert {h["id"] for h in hits} == {result_key(prefix, MODEL, docs[n])
                                       for n in ("violin", "piano")}
    assert {h["text"] for h in hits} == {DOCS["violin"][0], DOCS["piano"][0]}
    assert all(float(h["vector_distance"]) < 0.7 and int(h["meta_year"]) >= 2000 for h in hits)
    italian = index.query(VectorQuery(query_vector, "embedding", return_fields=["text"],
                                      num_results=5, filter_expression=Tag("meta_lang") == "it"))
    assert result_key(prefix, MODEL, docs["garden"]) in {h["id"] for h in italian}
    assert all(h["id"].startswith(f"{prefix}:{MODEL}:") for h in italian)


def test_langchain_recipe(gateway, docs):
    from langchain_openai import OpenAIEmbeddings
    from langchain_redis import RedisConfig, RedisVectorStore
    from redisvl.query.filter import Num

    embeddings = OpenAIEmbeddings(model=MODEL, base_url=f"{gateway.url}/v1",
                                  api_key=gateway.api_key, check_embedding_ctx_length=False)
    prefix = gateway.settings.key_prefix
    store = RedisVectorStore(embeddings, config=RedisConfig(
        index_name=f"{prefix}:idx:{MODEL}", redis_url=gateway.settings.redis_url,
        from_existing=True, content_field="text", embedding_field="embedding"))
    found = store.similarity_search("baking bread at home", k=1)
    assert found[0].page_content == DOCS["bread"][0]
    scored = store.similarity_search_with_score("a violin concert", k=2,
                                                filter=Num("meta_year") > 2010)
    assert scored[0][0].page_content == DOCS["violin"][0]
    assert all(int(doc.metadata["meta_year"]) > 2010 for doc, _ in scored)
