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
from test_worker_e2e import ThreadWorker, _env, make_settings

from embedstream.devstack import free_port
from embedstream.settings import Settings

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
        batch_max_wait_ms=5, intra_op_threads=1,
    )
    worker = ThreadWorker(settings)
    port = free_port()
    env = {
        **os.environ, **_env(settings),
        "EMBEDSTREAM_TOPIC_IMAGE": settings.topic_image,
        "EMBEDSTREAM_TOPIC_AUDIO": settings.topic_audio,
        "EMBEDSTREAM_METADATA_SCHEMA": json.dumps(SCHEMA),
        "EMBEDSTREAM_GATEWAY_API_KEYS": json.dumps([API_KEY]),
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
