"""The gateway's keys, scopes, tenants and rate limits with an in-memory publisher:
which answer each key gets, what a tenant-bound key stamps on what it publishes, keys
reloaded from a changed file, and the refusal to run open on a public address."""

from __future__ import annotations

import logging

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from embedstream.envelope import HEADER_TENANT
from embedstream.errors import ConfigError
from embedstream.gateway.app import create_app
from embedstream.gateway.auth import (
    SCOPE_EXTENSION,
    check_routes,
    document_scopes,
    hash_key,
    parse_line,
    require,
)
from embedstream.settings import Settings
from embedstream.testing import MemoryPublisher
from support.stack import wait_for

HASHED = "secret-hashed-key"


def make(lines: list[str], tmp_path, **overrides):
    keys = tmp_path / "keys"
    keys.write_text("\n".join(lines) + "\n")
    settings = Settings(gateway_search=False, gateway_api_keys_file=keys, **overrides)
    publisher = MemoryPublisher()
    return TestClient(create_app(settings, publisher)), publisher, keys


def ingest(client: TestClient, key: str | None, body: object = None):
    headers = {"X-API-Key": key} if key else {}
    return client.post("/v1/events/text", json=body or [{"id": "d1", "text": "hi"}], headers=headers)


def test_scopes_decide_401_403_and_hashed_keys_work(tmp_path):
    client, pub, _ = make([
        "plain-ingest scopes=ingest name=producer",
        f"{hash_key(HASHED)} scopes=search,admin",
    ], tmp_path)
    res = ingest(client, None)
    assert res.status_code == 401 and res.headers["WWW-Authenticate"] == "Bearer"
    assert ingest(client, "nope").json() == {"error": "unauthorized",
                                             "detail": "the API key is not valid"}
    forbidden = ingest(client, HASHED)
    assert forbidden.status_code == 403 and forbidden.json()["error"] == "forbidden"
    assert "'ingest' scope" in forbidden.json()["detail"]
    assert ingest(client, "plain-ingest").status_code == 202
    assert client.delete("/v1/items/d1", headers={"X-API-Key": "plain-ingest"}).status_code == 403
    bearer = client.delete("/v1/items/d1", headers={"Authorization": f"Bearer {HASHED}"})
    assert bearer.status_code == 202
    assert [key for _, key, _ in pub.published] == ["d1"] + ["d1"] * 3  # 1 event, 3 tombstones
    models = client.get("/v1/models", headers={"X-API-Key": "plain-ingest"}).json()
    assert (models["auth"], models["scopes"], models["tenant"]) == (True, ["ingest"], None)


def test_a_tenant_key_stamps_its_tenant_and_bodies_cannot_choose_one(tmp_path):
    client, pub, _ = make(["acme-key scopes=ingest,admin tenant=acme",
                           "plain scopes=ingest"], tmp_path, tenant_from="header")
    assert ingest(client, "acme-key").status_code == 202
    assert client.delete("/v1/items/d1?modality=text",
                         headers={"X-API-Key": "acme-key"}).status_code == 202
    assert ingest(client, "plain").status_code == 202
    assert pub.headers == [{HEADER_TENANT: b"acme"}, {HEADER_TENANT: b"acme"}, {}]
    for key in ("acme-key", "plain"):
        res = ingest(client, key, [{"text": "x", "tenant": "globex"}])
        assert res.status_code == 422 and "'tenant' is not yours to set" in res.json()["detail"]
    assert len(pub.published) == 3


def test_tenant_keys_need_a_deployment_that_reads_tenants(tmp_path):
    with pytest.raises(ConfigError, match="EMBEDSTREAM_TENANT_FROM=header"):
        make(["acme-key scopes=search tenant=acme"], tmp_path)  # tenant_from defaults to none


@pytest.mark.parametrize("line, message", [
    ("k scopes=ingest,delete", "scopes are ingest, search, admin"),
    ("k tenant=-bad", "not a tenant name"),
    ("k rate=fast", "rate='fast'"),
    ("k owner=me", "'owner' is not an option"),
    ("sha256$zz$00", "sha256$<salt hex>"),
])
def test_bad_key_lines_are_refused_without_showing_the_key(line, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("$", r"\$")) as err:
        make([line.replace("k ", "the-secret-k ", 1)], tmp_path)
    assert "the-secret-k" not in str(err.value) and "line 1" in str(err.value)


def test_a_key_line_without_scopes_keeps_every_scope_and_is_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "embedstream.gateway.auth"):
        client, _, _ = make(["legacy-key"], tmp_path)
    assert "key-1 has no scopes=" in caplog.text and "legacy-key" not in caplog.text
    assert client.delete("/v1/items/x", headers={"X-API-Key": "legacy-key"}).status_code == 202
    assert parse_line("k", "x").principal.scopes == {"ingest", "search", "admin"}


def test_a_changed_keys_file_is_reloaded_and_a_broken_one_is_not(tmp_path, caplog):
    client, _, keys = make(["old-key scopes=ingest"], tmp_path, gateway_api_keys_reload_s=0.05)
    keys.write_text("new-key scopes=ingest\n")
    assert wait_for(lambda: ingest(client, "new-key").status_code == 202, timeout=10)
    assert ingest(client, "old-key").status_code == 401  # revoked without a restart
    with caplog.at_level(logging.ERROR, "embedstream.gateway.auth"):
        keys.write_text("new-key scopes=everything\n")
        assert wait_for(lambda: ingest(client, "new-key") and "not reloaded" in caplog.text,
                        timeout=10)
        keys.write_text("# all keys removed\n")
        assert wait_for(lambda: ingest(client, "new-key") and "never opens" in caplog.text,
                        timeout=10)
    assert ingest(client, "new-key").status_code == 202  # the keys in force stayed
    assert ingest(client, None).status_code == 401


def test_rate_limit_is_429_with_retry_after_per_key(tmp_path):
    client, _, _ = make(["slow scopes=ingest rate=0.5 burst=2", "other scopes=ingest"], tmp_path,
                        gateway_rate_limit=1000)
    assert [ingest(client, "slow").status_code for _ in range(2)] == [202, 202]
    limited = ingest(client, "slow")
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 2
    assert ingest(client, "other").status_code == 202  # buckets are per key
    metrics = client.get("/metrics").text
    assert 'embedstream_gateway_auth_total{outcome="rate_limited",scope="ingest"} 1.0' in metrics
    assert "slow" not in metrics and "other" not in metrics


def test_a_public_address_needs_keys_or_an_explicit_anonymous(caplog):
    for host in ("0.0.0.0", "::", "10.1.2.3", "gateway.example.com"):
        with pytest.raises(ConfigError, match="--allow-anonymous"):
            create_app(Settings(gateway_search=False, gateway_host=host), MemoryPublisher())
    for host in ("127.0.0.1", "::1", "localhost"):
        client = TestClient(create_app(Settings(gateway_search=False, gateway_host=host),
                                       MemoryPublisher()))
        assert ingest(client, None).status_code == 202  # local use stays keyless
    with caplog.at_level(logging.WARNING, "embedstream.gateway.auth"):
        create_app(Settings(gateway_search=False, gateway_host="0.0.0.0",
                            gateway_allow_anonymous=True), MemoryPublisher())
    assert "WITHOUT API KEYS" in caplog.text


def test_a_route_must_declare_its_scope_and_the_spec_names_it():
    app = FastAPI()
    router = APIRouter(dependencies=[require("admin")])

    @router.post("/v1/rollouts")
    def rollout() -> None: ...

    app.include_router(router)
    check_routes(app)
    document_scopes(app)
    assert app.openapi()["paths"]["/v1/rollouts"]["post"][SCOPE_EXTENSION] == "admin"

    @app.get("/v1/forgotten")
    def forgotten() -> None: ...

    with pytest.raises(ConfigError, match="GET /v1/forgotten declares no scope"):
        check_routes(app)
