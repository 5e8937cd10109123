"""The gateway's ingest rules with an in-memory publisher: what is accepted, what is
refused with which 4xx, and that nothing of a refused request is published."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi.testclient import TestClient

from embedstream.gateway.app import create_app
from embedstream.gateway.query import ModelInfo, parse_filters
from embedstream.search import RangeFilter, TagFilter
from embedstream.settings import Settings
from embedstream.testing import MemoryPublisher


def make(**overrides):
    settings = Settings(gateway_max_request_bytes=4096, max_event_bytes=2048,
                        gateway_max_events=5, gateway_search=False, **overrides)
    publisher = MemoryPublisher()
    return TestClient(create_app(settings, publisher)), publisher


def test_json_envelopes_are_published_with_ids():
    client, pub = make()
    res = client.post("/v1/events/text", json=[{"text": "a", "metadata": {"n": 1}},
                                               {"id": "doc-2", "text": "b"}])
    assert res.status_code == 202, res.text
    ids = res.json()["ids"]
    assert len(ids) == 2 and ids[1] == "doc-2" and res.json()["topic"] == "embedstream.text"
    assert [(t, k) for t, k, _ in pub.published] == [("embedstream.text", ids[0]),
                                                       ("embedstream.text", "doc-2")]
    assert json.loads(pub.published[0][2]) == {"text": "a", "metadata": {"n": 1}, "id": ids[0]}


def test_binary_uploads_become_base64_envelopes():
    client, pub = make()
    res = client.post("/v1/events/image", files=[("file", ("a.png", b"\x89PNG1", "image/png")),
                                                  ("file", ("b.png", b"\x89PNG2", "image/png"))],
                      data={"metadata": '{"album": "x"}'})
    assert res.status_code == 202, res.text
    bodies = [json.loads(v) for _, _, v in pub.published]
    assert [base64.b64decode(b["data"]) for b in bodies] == [b"\x89PNG1", b"\x89PNG2"]
    assert bodies[0]["metadata"] == {"album": "x"}
    res = client.post("/v1/events/audio?id=clip-1", content=b"RIFF....",
                      headers={"Content-Type": "audio/wav"})
    assert res.status_code == 202 and res.json()["ids"] == ["clip-1"]
    res = client.post("/v1/events/text", content=b"plain text body",
                      headers={"Content-Type": "text/plain"})
    assert res.status_code == 202
    assert json.loads(pub.published[-1][2])["text"] == "plain text body"


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"content": b"{oops", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
    ({"json": {"id": "x"}}, 422, "missing_text"),
    ({"json": {"text": "  "}}, 422, "empty_text"),
    ({"json": [{"text": "ok"}, {"text": "x", "metadata": ["not", "an", "object"]}]}, 422,
     "invalid_field"),
    ({"json": [{"text": "ok"}, 42]}, 422, "not_an_object"),
    ({"json": []}, 422, "no_events"),
    ({"json": {"text": "x", "id": "has space"}}, 422, "invalid_field"),
    ({"json": [{"text": "x"}] * 6}, 413, "too_many_events"),
    ({"json": {"text": "x" * 3000}}, 413, "payload_too_large"),
    ({"content": b"x" * 5000, "headers": {"Content-Type": "application/json"}}, 413, "too_large"),
    ({"content": b"<a/>", "headers": {"Content-Type": "application/xml"}}, 415,
     "unsupported_media_type"),
    ({"content": b"hello"}, 415, "unsupported_media_type"),
])
def test_bad_requests_get_clear_4xx_and_publish_nothing(kwargs, status, code):
    client, pub = make()
    res = client.post("/v1/events/text", **kwargs)
    assert res.status_code == status, res.text
    assert res.json()["error"] == code and res.json()["detail"]
    assert pub.published == []
    metrics = client.get("/metrics").text
    assert f'embedstream_gateway_events_rejected_total{{reason="{code}"}} 1.0' in metrics


def test_streamed_body_over_the_limit_is_refused_without_content_length():
    client, pub = make()

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    res = client.post("/v1/events/text", content=chunks(),
                      headers={"Content-Type": "application/json"})
    assert res.status_code == 413 and pub.published == []


def test_unknown_modality_is_refused():
    client, pub = make()
    assert client.post("/v1/events/video", json={"text": "x"}).status_code == 404
    assert pub.published == []


def test_api_keys_from_settings_and_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# ops\nfile-key\n")
    client, pub = make(gateway_api_keys=["k1"], gateway_api_keys_file=keys)
    for headers in ({}, {"X-API-Key": "nope"}, {"Authorization": "Bearer nope"}):
        res = client.post("/v1/events/text", json={"text": "x"}, headers=headers)
        assert res.status_code == 401 and res.json()["error"] == "unauthorized"
        assert res.headers["WWW-Authenticate"] == "Bearer"
    assert pub.published == []
    assert client.post("/v1/events/text", json={"text": "x"},
                       headers={"X-API-Key": "k1"}).status_code == 202
    assert client.post("/v1/events/text", json={"text": "x"},
                       headers={"Authorization": "Bearer file-key"}).status_code == 202
    assert client.get("/healthz").status_code == 200  # health stays open
    assert "k1" not in repr(Settings(gateway_api_keys=["k1"]))


def test_backpressure_is_429_with_retry_after():
    client, pub = make()
    pub.backpressure = True
    res = client.post("/v1/events/text", json={"text": "x"})
    assert res.status_code == 429 and res.headers["Retry-After"] == "3"
    assert res.json()["error"] == "backpressure"
    assert client.get("/readyz").status_code == 503


def test_openapi_spec_documents_ingest_bodies_and_errors():
    client, _ = make()
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/events/image"]["post"]
    assert set(op["requestBody"]["content"]) == {
        "application/json", "multipart/form-data", "application/octet-stream"}
    text = spec["paths"]["/v1/events/text"]["post"]["requestBody"]["content"]
    assert set(text) == {"application/json", "text/plain"}
    assert text["application/json"]["schema"]["anyOf"][0]["required"] == ["text"]
    assert {"202", "400", "401", "413", "415", "422", "429", "503"} <= set(op["responses"])
    assert "/v1/search" in spec["paths"] and "/v1/embeddings/{model}/{event_id}" in spec["paths"]


def test_search_is_503_on_an_ingest_only_gateway():
    client, _ = make()
    res = client.post("/v1/search", json={"text": "x"})
    assert res.status_code == 503 and res.json()["error"] == "search_unavailable"


def test_filters_parse_against_the_schema():
    info = ModelInfo("m", "text", 8, {"lang": "tag", "year": "numeric"})
    assert parse_filters({"lang": ["en", "de"], "year": {"gte": 2000, "lt": 2020}}, info) == [
        TagFilter("lang", ("en", "de")), RangeFilter("year", 2000, 2020, high_exclusive=True)]
    assert parse_filters({"year": 2005}, info) == [RangeFilter("year", 2005, 2005)]
    for bad in ({"tenant": "x"}, {"lang": 3}, {"year": "new"}, {"year": {"near": 1}}, []):
        with pytest.raises(Exception, match="invalid_filter"):
            parse_filters(bad, info)


def test_queries_route_like_ingest_and_refused_media_is_a_4xx(tmp_path):
    """Each modality's query goes to that modality's default model (the worker's rule), not
    the default text model; media the preprocessor refuses is a 422 with its reason."""
    import numpy as np

    from embedstream.errors import EnvelopeError, GatewayError
    from embedstream.gateway.query import Searcher
    from embedstream.models.manifest import Manifest
    from embedstream.runtime.loader import LoadedModel

    class Refusing:
        modality = "image"

        def prepare(self, inputs):
            return [EnvelopeError("invalid_image", "cannot open image") for _ in inputs]

        def pack(self, items):
            return {}

    class Backend:
        provider = "Fake"

        def embed(self, inputs):
            return np.ones((1, 4), np.float32)

    def model(name: str, modality: str) -> LoadedModel:
        manifest = Manifest(name=name, modality=modality, dimension=4, pooling="mean",
                            normalize=True, inputs=["x"], tokenizer_files=[], max_length=8,
                            opset=17, sha256="-")
        return LoadedModel(manifest, tmp_path, Backend(), Refusing())  # type: ignore[arg-type]

    models = {n: model(n, m) for n, m in [("all-minilm-l6-v2", "text"), ("clip-a", "image"),
                                           ("efficientnet-lite0", "image"), ("aisfx", "audio")]}
    class NoRollouts:  # Redis without a control document: every name serves itself
        def get(self, key):
            return None

    searcher = Searcher(Settings(), models, client=NoRollouts())  # type: ignore[arg-type]
    assert searcher.model_for(None, "image").name == "efficientnet-lite0"
    assert searcher.model_for(None, "audio").name == "aisfx"
    assert searcher.model_for(None, "text").name == "all-minilm-l6-v2"
    other = Searcher(Settings(default_image_model="absent"), models,
                     client=NoRollouts())  # type: ignore[arg-type]
    assert other.model_for(None, "image").name == "clip-a"  # first served by name
    with pytest.raises(GatewayError) as caught:
        searcher.embed(searcher.model_for(None, "image"), b"not an image")
    assert (caught.value.status, caught.value.code) == (422, "invalid_image")


def test_every_request_is_counted_and_timed_by_route_name_and_status():
    from embedstream.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    settings = Settings(gateway_search=False)
    client = TestClient(create_app(settings, MemoryPublisher(), metrics=metrics))
    assert client.post("/v1/events/text", json={"text": "a"}).status_code == 202
    assert client.post("/v1/events/text", json={"text": " "}).status_code == 422
    assert client.get("/no/such/path").status_code == 404
    assert client.get("/openapi.json").status_code == 200

    def count(route: str, status: str) -> float:
        return metrics.registry.get_sample_value(
            "embedstream_gateway_requests_total", {"route": route, "status": status}) or 0.0

    assert (count("ingest", "202"), count("ingest", "422")) == (1, 1)
    assert (count("other", "404"), count("docs", "200")) == (1, 1)
    timed = metrics.registry.get_sample_value(
        "embedstream_gateway_request_seconds_count", {"route": "ingest"})
    assert timed == 2
