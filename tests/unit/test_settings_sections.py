"""The settings' sections: typed views of the one Settings, with its names and types."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from embedstream.sections import GatewaySettings, KafkaSettings, PayloadSettings, RedisSettings
from embedstream.settings import Settings

SECTIONS = {"kafka": KafkaSettings, "redis": RedisSettings, "payloads": PayloadSettings,
            "gateway": GatewaySettings}
DERIVED = {"explicit"}  # worked out from the Settings, not one of its fields


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_section_field_is_a_setting_of_the_same_type(name: str) -> None:
    section = SECTIONS[name]
    hints = typing.get_type_hints(section)
    for field in dataclasses.fields(section):
        if field.name in DERIVED:
            continue
        assert field.name in Settings.model_fields, f"{name}.{field.name} is no setting"
        assert hints[field.name] == Settings.model_fields[field.name].annotation, field.name


def test_sections_read_the_same_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDSTREAM_REDIS_URL", "redis://elsewhere:6390/0")
    monkeypatch.setenv("EMBEDSTREAM_KAFKA_BOOTSTRAP", "a:9092, b:9093")
    monkeypatch.setenv("EMBEDSTREAM_FETCH_MAX_BYTES", "1234")
    monkeypatch.setenv("EMBEDSTREAM_GATEWAY_RATE_LIMIT", "7.5")
    settings = Settings()
    assert settings.redis.redis_url == "redis://elsewhere:6390/0"
    assert settings.kafka.bootstrap_servers() == ["a:9092", "b:9093"]
    assert settings.payloads.fetch_max_bytes == 1234
    assert settings.gateway.gateway_rate_limit == 7.5


def test_a_section_is_frozen_and_says_which_index_settings_were_asked_for() -> None:
    redis = Settings(index_m=8).redis
    assert "index_m" in redis.explicit and "index_ef_runtime" not in redis.explicit
    with pytest.raises(dataclasses.FrozenInstanceError):
        redis.key_prefix = "other"  # type: ignore[misc]


def test_a_topic_is_named_in_one_place() -> None:
    settings = Settings(topic_image="pictures")
    assert settings.topic_for("image") == settings.kafka.topic_for("image") == "pictures"
