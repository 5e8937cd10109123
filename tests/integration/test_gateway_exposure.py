"""The `embedstream gateway` command as an operator runs it: it refuses to serve a
public address without keys, warns when told to, enforces per-key rate limits under a
bounded loopback load (429 + Retry-After), and takes new keys without a restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from embedstream.devstack import free_port
from support.stack import wait_for

RATE, BURST = 5.0, 5


def gateway_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "embedstream", "gateway", "--no-search", *args]


def env_for(stack, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSTREAM_")}
    return {**env, "EMBEDSTREAM_KAFKA_BOOTSTRAP": stack.bootstrap, **extra}


def test_a_public_address_without_keys_is_refused_at_once(stack):
    result = subprocess.run(gateway_cmd("--host", "0.0.0.0", "--port", str(free_port())),
                            env=env_for(stack), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no API keys are configured" in result.stderr
    assert "--allow-anonymous" in result.stderr and "embedstream api-key" in result.stderr


@pytest.fixture
def serve(stack, tmp_path):
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, **env: str) -> tuple[str, Path]:
        port = free_port()
        log = tmp_path / f"gateway-{port}.log"
        with log.open("wb") as out:
            procs.append(subprocess.Popen(gateway_cmd("--port", str(port), *args),
                                          env=env_for(stack, **env), stdout=out, stderr=out))
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert procs[-1].poll() is None, log.read_text()
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(up, timeout=60), log.read_text()
        return url, log

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def test_anonymous_on_purpose_is_served_and_warned_about(serve):
    url, log = serve("--host", "0.0.0.0", "--allow-anonymous")
    assert httpx.get(f"{url}/v1/models", timeout=5).json()["auth"] is False
    assert "WARNING" in log.read_text() and "WITHOUT API KEYS" in log.read_text()


def test_rate_limit_under_load_and_keys_reloaded_without_restart(serve, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"first-key scopes=search rate={RATE} burst={BURST}\n")
    url, _ = serve("--api-keys-file", str(keys), EMBEDSTREAM_GATEWAY_API_KEYS_RELOAD_S="0.2")

    def call(key: str) -> httpx.Response:
        return httpx.get(f"{url}/v1/models", headers={"X-API-Key": key}, timeout=10)

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:  # bounded: 60 requests, 4 at a time
        answers = list(pool.map(call, ["first-key"] * 60))
    elapsed = time.monotonic() - started
    codes = [r.status_code for r in answers]
    assert set(codes) == {200, 429}
    assert codes.count(200) <= BURST + RATE * elapsed + 1  # the bucket held
    limited = [r for r in answers if r.status_code == 429]
    assert all(r.json()["error"] == "rate_limited" for r in limited)
    retry = {int(r.headers["Retry-After"]) for r in limited}
    assert retry and min(retry) >= 1 and max(retry) <= 1 + int(1 / RATE)
    assert wait_for(lambda: call("first-key").status_code == 200, timeout=5)  # refilled
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'embedstream_gateway_auth_total{outcome="rate_limited",scope="any"}' in metrics
    assert "first-key" not in metrics

    keys.write_text("second-key scopes=search\n")  # as a Secret update lands in the pod
    assert wait_for(lambda: call("second-key").status_code == 200, timeout=10)
    assert call("first-key").status_code == 401
