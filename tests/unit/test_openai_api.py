"""The OpenAI-compatible /v1/embeddings over a fake text model: the response shape,
base64, Matryoshka cuts, and OpenAI's error shape for every bad request."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from embedstream.gateway.app import create_app
from embedstream.gateway.query import Searcher
from embedstream.settings import Settings
from embedstream.testing import MemoryPublisher
from support.pipeline import DIM, fake_model


class NoRedis:
    """Redis without a control document (every name serves itself, no rollout); the app
    closes it at shutdown."""

    def get(self, key):
        return None

    def close(self) -> None:
        pass


@pytest.fixture
def client(tmp_path):
    model = fake_model(tmp_path)
    model.manifest.extra["matryoshka_dims"] = [4]
    settings = Settings(gateway_api_keys=["k1"])
    searcher = Searcher(settings, {"fake": model}, client=NoRedis())  # type: ignore[arg-type]
    with TestClient(create_app(settings, MemoryPublisher(), searcher),
                    headers={"Authorization": "Bearer k1"}) as test_client:
        yield test_client, model


def test_vectors_come_back_in_order_with_usage(client):
    test_client, model = client
    res = test_client.post("/v1/embeddings", json={"model": "fake", "input": ["w1 w2", "w3"]})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["object"] == "list" and body["model"] == "fake"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == DIM for d in body["data"])
    expected = model.embed_texts(["w1 w2", "w3"])
    assert np.allclose([d["embedding"] for d in body["data"]], expected, atol=1e-6)
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_base64_and_matryoshka_dimensions(client):
    test_client, model = client
    res = test_client.post("/v1/embeddings", json={"model": "fake", "input": "w5 w0 w6",
                                                   "encoding_format": "base64", "dimensions": 4})
    assert res.status_code == 200, res.text
    vector = np.frombuffer(base64.b64decode(res.json()["data"][0]["embedding"]), "<f4")
    full = model.embed_texts(["w5 w0 w6"])[0]
    assert vector.shape == (4,) and np.isclose(np.linalg.norm(vector), 1.0)
    assert np.allclose(vector, full[:4] / np.linalg.norm(full[:4]), atol=1e-6)


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"model": "fake", "input": [1, 2, 3]}, 400, "token_ids_not_supported", "input"),
    ({"model": "fake", "input": [[1, 2], [3]]}, 400, "token_ids_not_supported", "input"),
    ({"model": "fake", "input": []}, 400, "invalid_value", "input"),
    ({"model": "fake", "input": ["ok", " "]}, 400, "invalid_value", "input"),
    ({"model": "fake", "input": ["ok", 3]}, 400, "invalid_value", "input"),
    ({"model": "fake", "input": "w1", "dimensions": 3}, 400, "invalid_value", "dimensions"),
    ({"model": "fake", "input": "w1", "encoding_format": "int8"}, 400, "invalid_value",
     "encoding_format"),
    ({"input": "w1"}, 400, "invalid_value", "model"),
    ({"model": "fake", "input": "w1 w2 w3 w4 w5 w6 w7"}, 400, "context_length_exceeded", "input"),
    ({"model": "gpt-4", "input": "w1"}, 404, "unknown_model", None),
])
def test_bad_requests_get_openai_errors(client, body, status, code, param):
    test_client, _ = client
    res = test_client.post("/v1/embeddings", json=body)
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert error["code"] == code and error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"


def test_auth_and_malformed_bodies_use_the_same_shape(client):
    test_client, _ = client
    res = test_client.post("/v1/embeddings", json={"model": "fake", "input": "w1"},
                           headers={"Authorization": "Bearer wrong"})
    assert res.status_code == 401 and res.json()["error"]["type"] == "authentication_error"
    res = test_client.post("/v1/embeddings", content=b"{nope",
                           headers={"Content-Type": "application/json"})
    assert res.status_code == 400 and res.json()["error"]["code"] == "invalid_json"
