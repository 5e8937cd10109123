"""A real gateway (the ``embedstream gateway`` command) in front of a real worker,
broker and Redis, shared by the gateway's API, schema and browser tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from e2e_support import MODEL, ThreadWorker, make_settings, wait_for, worker_env_vars
from fastapi.testclient import TestClient

from embedstream.devstack import free_port
from embedstream.gateway.app import create_app
from embedstream.gateway.auth import hash_key
from embedstream.gateway.publisher import KafkaEventPublisher
from embedstream.gateway.query import Searcher
from embedstream.runtime.loader import load_models
from embedstream.settings import Settings
from embedstream.sinks.redis import connect

API_KEY = "test-key-" + uuid.uuid4().hex[:6]
SCHEMA = {"lang": "tag", "year": "numeric"}


@dataclass
class Gateway:
    url: str
    settings: Settings
    worker: ThreadWorker
    api_key: str = API_KEY

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": self.api_key}, timeout=60)


@pytest.fixture(scope="session")
def gateway(stack, model_root, tmp_path_factory) -> Iterator[Gateway]:
    unique = "g" + uuid.uuid4().hex[:10]
    settings = make_settings(
        stack, unique, model_root, topic_image=f"{unique}.image", topic_audio=f"{unique}.audio",
        topic_results=f"{unique}.results", publish_results=True, metadata_schema=SCHEMA,
        # binary mode: the value stays the plain results JSON, the ce_* headers come along
        results_cloudevents="binary",
        batch_max_wait_ms=5, intra_op_threads=1, tenant_from="header",
    )
    worker = ThreadWorker(settings)
    port = free_port()
    env = {
        **os.environ, **worker_env_vars(settings),
        "EMBEDSTREAM_TOPIC_IMAGE": settings.topic_image,
        "EMBEDSTREAM_TOPIC_AUDIO": settings.topic_audio,
        "EMBEDSTREAM_METADATA_SCHEMA": json.dumps(SCHEMA),
        "EMBEDSTREAM_GATEWAY_API_KEYS": json.dumps([API_KEY]),
        "EMBEDSTREAM_TENANT_FROM": "header",
    }
    log = (tmp_path_factory.mktemp("gateway") / "gateway.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedstream", "gateway", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"gateway exited; log: {log.name}"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"gateway not ready; log: {log.name}"
            time.sleep(0.2)
        yield Gateway(url, settings, worker)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        worker.stop()


# Keys of the scoped gateway: one per scope, one with every scope, one per tenant (A's
# given hashed, as a Secret would hold it).
SCOPED_KEYS = {
    "ingest": "k-ingest-" + uuid.uuid4().hex, "search": "k-search-" + uuid.uuid4().hex,
    "admin": "k-admin-" + uuid.uuid4().hex, "all": "k-all-" + uuid.uuid4().hex,
    "tenant-a": "k-acme-" + uuid.uuid4().hex, "tenant-b": "k-globex-" + uuid.uuid4().hex,
}
TENANTS = {"tenant-a": "acme", "tenant-b": "globex"}


@dataclass
class ScopedGateway:
    """An in-process gateway with scoped and tenant-bound keys over the session
    gateway's broker, worker, Redis and topics."""

    client: TestClient
    settings: Settings
    keys: dict[str, str]

    def as_key(self, name: str | None) -> dict[str, str]:
        return {"X-API-Key": self.keys[name]} if name else {}


@pytest.fixture(scope="session")
def scoped_gateway(gateway, model_root, tmp_path_factory) -> Iterator[ScopedGateway]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys"
    lines = [f"{SCOPED_KEYS[s]} scopes={s} name={s}" for s in ("ingest", "search", "admin")]
    lines.append(f"{SCOPED_KEYS['all']} scopes=ingest,search,admin name=all")
    lines.append(f"{hash_key(SCOPED_KEYS['tenant-a'])} scopes=ingest,search,admin tenant=acme")
    lines.append(f"{SCOPED_KEYS['tenant-b']} scopes=ingest,search,admin tenant=globex")
    keys_file.write_text("\n".join(lines) + "\n")
    settings = gateway.settings.model_copy(update={"gateway_api_keys_file": keys_file})
    models = load_models(model_root, [MODEL], providers=[], threads=1)
    searcher = Searcher(settings, models, connect(settings.redis))
    app = create_app(settings, KafkaEventPublisher(settings.kafka, settings.gateway), searcher)
    with TestClient(app) as client:
        assert wait_for(lambda: client.get("/readyz").status_code == 200, timeout=60)
        yield ScopedGateway(client, settings, SCOPED_KEYS)
