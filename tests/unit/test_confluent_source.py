"""The confluent-kafka source without a broker: settings mapped onto librdkafka's
properties (and accepted by librdkafka itself), records mapped like kafka-python's,
and the client registry, its setting and its CLI flag."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

confluent_kafka = pytest.importorskip("confluent_kafka")

import embedstream.sources  # noqa: E402
from embedstream.cli.app import build_parser  # noqa: E402
from embedstream.cli.flags import settings_from_args  # noqa: E402
from embedstream.errors import ConfigError  # noqa: E402
from embedstream.settings import Settings  # noqa: E402
from embedstream.sources import registry  # noqa: E402
from embedstream.sources.confluent import ConfluentSource, _record, client_config  # noqa: E402

QUIET = logging.getLogger("test.librdkafka")  # librdkafka would print to stderr otherwise


def accepted_by_librdkafka(config: dict) -> None:
    """librdkafka refuses unknown property names and bad values at construction."""
    confluent_kafka.Producer({**config, "logger": QUIET}).flush(0)


def test_sasl_ssl_settings_map_to_librdkafka_properties():
    import certifi

    settings = Settings(
        kafka_bootstrap="b1:9093, b2:9093", kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="svc",
        kafka_sasl_password="hunter2", kafka_ssl_cafile=Path(certifi.where()),
    )
    config = client_config(settings.kafka)
    assert config["bootstrap.servers"] == "b1:9093,b2:9093"
    assert config["security.protocol"] == "sasl_ssl"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (config["sasl.username"], config["sasl.password"]) == ("svc", "hunter2")
    assert config["ssl.ca.location"] == certifi.where()
    assert config["client.id"].startswith("embedstream-")
    accepted_by_librdkafka(config)


def test_mutual_tls_files_map_to_librdkafka_properties(tmp_path):
    settings = Settings(kafka_security_protocol="SSL", kafka_ssl_certfile=tmp_path / "c.pem",
                        kafka_ssl_keyfile=tmp_path / "k.pem")
    config = client_config(settings.kafka)
    assert config["security.protocol"] == "ssl"
    assert config["ssl.certificate.location"] == str(tmp_path / "c.pem")
    assert config["ssl.key.location"] == str(tmp_path / "k.pem")
    assert not any(k.startswith("sasl.") for k in config)
    # librdkafka knows the names: it fails on the missing files, not on the properties.
    with pytest.raises(confluent_kafka.KafkaException) as err:
        accepted_by_librdkafka(config)
    assert "ssl." in str(err.value) and "No such configuration property" not in str(err.value)


def test_plaintext_has_no_security_properties_and_incomplete_sasl_fails_clearly():
    config = client_config(Settings().kafka)
    assert config["security.protocol"] == "plaintext"
    assert not any(k.startswith(("sasl.", "ssl.")) for k in config)
    accepted_by_librdkafka(config)
    with pytest.raises(ConfigError, match="kafka_sasl_password"):
        client_config(Settings(kafka_security_protocol="SASL_PLAINTEXT",
                               kafka_sasl_mechanism="PLAIN", kafka_sasl_username="svc").kafka)


def test_records_carry_key_value_timestamp_and_headers_like_kafka_python():
    msg = confluent_kafka.Message(
        topic="t.text", partition=2, offset=41, key=b"id-1", value=b'{"text": "x"}',
        headers=[("content-type", b"text/plain"), ("empty", None)],
        timestamp=(confluent_kafka.TIMESTAMP_CREATE_TIME, 1_700_000_000_123),
    )
    record = _record(msg)
    assert (record.topic, record.partition, record.offset) == ("t.text", 2, 41)
    assert (record.key, record.value) == (b"id-1", b'{"text": "x"}')
    assert record.timestamp_ms == 1_700_000_000_123
    assert record.headers == (("content-type", b"text/plain"), ("empty", None))
    bare = _record(confluent_kafka.Message(topic="t", partition=0, offset=0, timestamp=(0, -1)))
    assert bare.headers == () and bare.key is None and bare.value is None


def test_the_registry_picks_the_client_by_name():
    assert registry.kafka_client("kafka-python").name == "kafka-python"
    confluent = registry.kafka_client("confluent")
    assert confluent.source is ConfluentSource
    with pytest.raises(ConfigError, match="unknown kafka_client 'kafka-go'"):
        registry.kafka_client("kafka-go")


def test_a_missing_confluent_kafka_is_a_config_error_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)  # import fails as if absent
    monkeypatch.delitem(sys.modules, "embedstream.sources.confluent", raising=False)
    monkeypatch.delattr(embedstream.sources, "confluent", raising=False)
    with pytest.raises(ConfigError, match=r"embedstream\[confluent\]"):
        registry.kafka_client("confluent")


def test_kafka_client_setting_from_env_and_cli(monkeypatch):
    assert Settings().kafka_client == "kafka-python"
    monkeypatch.setenv("EMBEDSTREAM_KAFKA_CLIENT", "confluent")
    assert Settings().kafka_client == "confluent"
    args = build_parser().parse_args(["worker", "--kafka-client", "kafka-python"])
    assert settings_from_args(args).kafka_client == "kafka-python"  # the flag wins over the env
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--kafka-client", "librdkafka"])
    monkeypatch.setenv("EMBEDSTREAM_KAFKA_CLIENT", "nope")
    with pytest.raises(ValueError, match="kafka_client"):
        Settings()
