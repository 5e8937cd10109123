"""Secrets stay secret, credentials work, nothing deserialises code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis

from embedstream.devstack import free_port
from embedstream.errors import ConfigError
from embedstream.producer import Producer
from embedstream.settings import Settings
from embedstream.sinks.redis import connect, result_key
from embedstream.sources.kafka import client_config

SERVICES = Path(__file__).resolve().parents[2] / "services" / "embedstream"


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.read().decode()
    except urllib.error.HTTPError as err:
        return err.read().decode()


def test_redis_acl_user_works_and_its_password_never_shows(stack, unique, model_root, tmp_path):
    password = f"pw-{unique}-Secret!"
    admin = redis.Redis.from_url(stack.redis_url)
    admin.execute_command("ACL", "SETUSER", unique, "on", f">{password}", "~*", "&*", "+@all")
    secret_file = tmp_path / "redis-password"
    secret_file.write_text(password + "\n")
    port = free_port()
    env = {
        **os.environ,
        "EMBEDSTREAM_KAFKA_BOOTSTRAP": stack.bootstrap, "EMBEDSTREAM_REDIS_URL": stack.redis_url,
        "EMBEDSTREAM_REDIS_USERNAME": unique,
        "EMBEDSTREAM_REDIS_PASSWORD_FILE": str(secret_file),  # the Kubernetes-secret way
        "EMBEDSTREAM_TOPIC_TEXT": f"{unique}.text", "EMBEDSTREAM_TOPIC_DLQ": f"{unique}.dlq",
        "EMBEDSTREAM_GROUP_ID": unique, "EMBEDSTREAM_KEY_PREFIX": unique,
        "EMBEDSTREAM_MODEL_DIR": str(model_root), "EMBEDSTREAM_SESSION_TIMEOUT_MS": "6000",
        "EMBEDSTREAM_HEARTBEAT_INTERVAL_MS": "1000", "EMBEDSTREAM_LOG_LEVEL": "DEBUG",
    }
    log_path = tmp_path / "worker.log"  # a file: DEBUG output would fill a pipe
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "embedstream", "worker", "--metrics-port", str(port),
             "--metrics-host", "127.0.0.1"],
            env=env, stderr=log, stdout=log,
        )
    try:
        settings = Settings(kafka_bootstrap=stack.bootstrap, topic_text=f"{unique}.text")
        with Producer(settings.kafka) as producer:
            producer.send_text("credentials in, secrets kept", id="secure")
            producer.send_raw(settings.topic_text, "bad", b"{bad json")
            producer.flush()
        key = result_key(unique, "all-minilm-l6-v2", "secure")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not admin.exists(key):
            time.sleep(0.2)
        assert admin.exists(key)  # written by the worker as the ACL user
        pages = [_get(f"http://127.0.0.1:{port}{path}") for path in ("/metrics", "/readyz",
                                                                      "/healthz")]
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    stderr = log_path.read_text()
    assert worker.returncode == 0
    assert "DEBUG" in stderr  # the logs were verbose, and still:
    for text in [stderr, *pages]:
        assert password not in text
    assert "embedstream_events_embedded_total" in pages[0]


def test_a_wrong_redis_password_fails_clearly_without_showing_it(stack, unique, model_root):
    admin = redis.Redis.from_url(stack.redis_url)
    admin.execute_command("ACL", "SETUSER", unique, "on", ">right-one", "~*", "&*", "+@all")
    wrong = f"wrong-{unique}"
    result = subprocess.run(
        [sys.executable, "-m", "embedstream", "worker", "--model-dir", str(model_root)],
        env={**os.environ, "EMBEDSTREAM_KAFKA_BOOTSTRAP": stack.bootstrap,
             "EMBEDSTREAM_REDIS_URL": stack.redis_url, "EMBEDSTREAM_REDIS_USERNAME": unique,
             "EMBEDSTREAM_REDIS_PASSWORD": wrong, "EMBEDSTREAM_METRICS_PORT": "0"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "Redis" in result.stderr and ("password" in result.stderr.lower()
                                         or "auth" in result.stderr.lower())
    assert wrong not in result.stderr + result.stdout


def test_kafka_sasl_and_tls_settings_reach_the_client():
    settings = Settings(
        kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc", kafka_sasl_password="hunter2",
        kafka_ssl_cafile=Path("/etc/ca.pem"),
    )
    config = client_config(settings.kafka)
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (config["sasl_plain_username"], config["sasl_plain_password"]) == ("svc", "hunter2")
    assert config["ssl_cafile"] == "/etc/ca.pem"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    with pytest.raises(ConfigError, match="kafka_sasl_password"):
        client_config(Settings(kafka_security_protocol="SASL_PLAINTEXT",
                               kafka_sasl_mechanism="PLAIN", kafka_sasl_username="svc").kafka)


def test_redis_connection_settings(tmp_path):
    settings = Settings(redis_url="rediss://cache:6380/1", redis_username="app",
                        redis_password="pw", redis_ssl_ca_file=tmp_path / "ca.pem")
    kwargs = connect(settings.redis).connection_pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("app", "pw")
    assert kwargs["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    assert kwargs["host"] == "cache" and kwargs["port"] == 6380


# Modules and calls that turn data into code. Process start-up pickles our own
# Settings between our own processes (multiprocessing); nothing else may. The
# exporter may read a PyTorch checkpoint only through torch's restricted
# weights_only unpickler (tensors and an explicit allowlist, no code).
FORBIDDEN = re.compile(
    r"^\s*(import|from)\s+(pickle|cPickle|dill|shelve|marshal|cloudpickle|joblib)\b"
    r"|\b(pickle|marshal|dill)\.loads?\(|\byaml\.load\(|(?<![.\w])(eval|exec)\("
    r"|allow_pickle\s*=\s*True|\btorch\.load\((?![^)]*weights_only=True)",
    re.MULTILINE,
)


def test_no_code_executing_deserialisation_anywhere():
    offenders = [
        f"{path.relative_to(SERVICES)}: {match.group(0).strip()}"
        for path in SERVICES.rglob("*.py")
        for match in FORBIDDEN.finditer(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
