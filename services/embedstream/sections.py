"""Typed sections of :class:`~embedstream.settings.Settings`: what each component reads.

``Settings`` stays the one declaration of every setting (its name, environment
variable, flag, default and description; see :mod:`embedstream.settings`). A
section is a frozen, typed view of the fields one kind of component needs, with
the same names, built from a ``Settings`` by its property of the same name::

    RedisSink(settings.redis)            # the store: connection, keys, index
    kit.source(settings.kafka, topics, listener)
    PayloadResolver(settings.payloads)

So a component's signature says which settings it depends on, a type checker
holds it to them, and a test builds one from a ``Settings`` with only those
fields set. The services (worker, gateway, CLI commands) are where the whole
``Settings`` is read and the sections handed out.

This module imports nothing of the package: ``Settings`` builds the sections,
not the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import SecretStr


class _Section:
    """Built from any object with the section's fields as attributes (a ``Settings``)."""

    __slots__ = ()

    @classmethod
    def of(cls, source: Any) -> Self:
        derived = cls._derived(source)
        values = {f.name: getattr(source, f.name) for f in fields(cls)  # type: ignore[arg-type]
                  if f.name not in derived}
        return cls(**values, **derived)

    @staticmethod
    def _derived(source: Any) -> dict[str, Any]:
        """Fields that are not attributes of ``source`` but worked out from it."""
        return {}


@dataclass(frozen=True, slots=True)
class KafkaSettings(_Section):
    """The broker and its clients: consumers, the dead-letter and results producers, admin."""

    kafka_bootstrap: str
    kafka_client: Literal["kafka-python", "confluent"]
    group_id: str
    topic_text: str
    topic_image: str
    topic_audio: str
    topic_dlq: str
    topic_results: str
    topic_partitions: int
    topic_replication: int
    session_timeout_ms: int
    heartbeat_interval_ms: int
    max_poll_interval_ms: int
    max_poll_records: int
    kafka_fetch_max_wait_ms: int
    kafka_max_partition_fetch_bytes: int
    auto_offset_reset: str
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None
    kafka_sasl_username: str | None
    kafka_sasl_password: SecretStr | None
    kafka_ssl_cafile: Path | None
    kafka_ssl_certfile: Path | None
    kafka_ssl_keyfile: Path | None
    max_in_flight_bytes: int
    """The consumer's fetch buffer is bounded by it (confluent's queued bytes)."""
    dlq_max_record_bytes: int
    results_include_vector: bool
    results_cloudevents: Literal["off", "binary", "structured"]

    def topic_for(self, modality: str) -> str:
        """The input topic of a modality."""
        return {"text": self.topic_text, "image": self.topic_image,
                "audio": self.topic_audio}[modality]

    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap.split(",") if s.strip()]


@dataclass(frozen=True, slots=True)
class RedisSettings(_Section):
    """The store: how to reach Redis, the key layout, and each model's vector index."""

    redis_url: str
    redis_username: str | None
    redis_password: SecretStr | None
    redis_ssl_ca_file: Path | None
    redis_socket_timeout_s: float
    redis_cluster: Literal["auto", "yes", "no"]
    redis_cluster_search: Literal["auto", "coordinator", "shards"]
    key_prefix: str
    store_text: bool
    create_index: bool
    index_algorithm: Literal["HNSW", "FLAT", "SVS-VAMANA"]
    index_vector_type: Literal["FLOAT32", "FLOAT16"]
    index_m: int
    index_ef_construction: int
    index_ef_runtime: int
    tombstone_retention_s: int
    metadata_schema: dict[str, Literal["tag", "numeric"]]
    explicit: frozenset[str]
    """The names of the fields given (environment, flags, arguments) rather than left at
    their defaults: an index made under older defaults is kept, one that differs from
    settings asked for is refused (see :mod:`embedstream.sinks.index`)."""

    @staticmethod
    def _derived(source: Any) -> dict[str, Any]:
        return {"explicit": frozenset(getattr(source, "model_fields_set", ()))}


@dataclass(frozen=True, slots=True)
class PayloadSettings(_Section):
    """Payloads sent by reference (``file://``, ``http(s)://``): where from, how big."""

    payload_max_inline_bytes: int
    uri_roots: list[Path]
    uri_allowed_hosts: list[str]
    uri_allow_private_networks: bool
    fetch_max_bytes: int
    fetch_timeout_s: float


@dataclass(frozen=True, slots=True)
class GatewaySettings(_Section):
    """The HTTP gateway: where it listens, who may call it, how much it takes and buffers."""

    gateway_host: str
    gateway_port: int
    gateway_max_request_bytes: int
    gateway_max_events: int
    max_event_bytes: int
    gateway_api_keys: list[SecretStr]
    gateway_api_keys_file: Path | None
    gateway_api_keys_reload_s: float
    gateway_allow_anonymous: bool
    gateway_rate_limit: float
    gateway_rate_burst: int
    tenant_from: Literal["none", "header", "envelope"]
    gateway_publish_timeout_s: float
    gateway_buffer_bytes: int
    gateway_retry_after_s: int
    gateway_search_max_k: int
    gateway_search: bool
