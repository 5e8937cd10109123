"""One typed settings object, built at the entry point and passed down.

Every field reads from an environment variable ``EMBEDSTREAM_<FIELD>`` (for
example ``EMBEDSTREAM_KAFKA_BOOTSTRAP``); command-line flags override the
environment. Nothing in the package reads the environment anywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MODALITIES = ("text", "image", "audio")


class Settings(BaseSettings):
    """Configuration of every embedstream service.

    Tuning notes sit beside each field. Secrets are :class:`SecretStr`, so they
    never show in ``repr`` or logs.
    """

    model_config = SettingsConfigDict(env_prefix="EMBEDSTREAM_", extra="ignore")

    # --- Kafka -------------------------------------------------------------
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092", description="Comma-separated bootstrap servers (host:port)."
    )
    group_id: str = Field(
        "embedstream-workers",
        description="Consumer group of the worker pool. Workers with one group share partitions.",
    )
    topic_text: str = Field("embedstream.text", description="Topic of text events.")
    topic_image: str = Field("embedstream.image", description="Topic of image events.")
    topic_audio: str = Field("embedstream.audio", description="Topic of audio events.")
    topic_dlq: str = Field(
        "embedstream.dlq", description="Dead-letter topic: rejected events, reason in headers."
    )
    topic_partitions: int = Field(
        4, ge=1, description="Partitions of topics the worker creates when missing. "
        "The ceiling on workers that share one topic."
    )
    topic_replication: int = Field(1, ge=1, description="Replication factor of created topics.")
    session_timeout_ms: int = Field(
        10_000, ge=1000, description="Consumer session timeout. Lower detects dead workers "
        "sooner; too low evicts workers that pause (GC, slow batches)."
    )
    heartbeat_interval_ms: int = Field(3_000, ge=100, description="Consumer heartbeat interval.")
    max_poll_interval_ms: int = Field(
        300_000, ge=1000, description="Longest gap between polls before the group evicts a worker."
    )
    auto_offset_reset: str = Field(
        "earliest", description="Where a new group starts: 'earliest' or 'latest'."
    )

    # --- Redis -------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL (redis:// or rediss:// for TLS)."
    )
    redis_password: SecretStr | None = Field(
        None, description="Redis password; overrides one in the URL. Never logged."
    )
    key_prefix: str = Field(
        "embedstream", description="Prefix of result keys: <prefix>:<model>:<id>."
    )
    store_text: bool = Field(
        True, description="Store a text event's text in its hash ('text' field), so search "
        "results can show it. Turn off when texts are large or sensitive."
    )
    create_index: bool = Field(
        True, description="Create a vector index per model when the server supports search."
    )

    # --- Models ------------------------------------------------------------
    model_dir: Path = Field(
        Path("models"), description="Root folder of model directories (one per model)."
    )
    default_text_model: str = Field(
        "all-minilm-l6-v2", description="Model of text events that name none."
    )
    models: list[str] = Field(
        default_factory=list,
        description="Models the worker loads at start (default: every model in model_dir). "
        "Env: JSON list, e.g. '[\"all-minilm-l6-v2\"]'.",
    )
    providers: list[str] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers in order of preference, e.g. "
        "'[\"CUDAExecutionProvider\"]'. Empty: the best available (TensorRT, CUDA, CPU).",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads per worker process. 0: the cores this "
        "process is given (cores / processes). Set it to the cores in the pod's CPU limit."
    )

    # --- Batching ----------------------------------------------------------
    batch_max_items: int = Field(
        32, ge=1, description="Most events in one inference batch. On CPU 16-32 is best; "
        "on GPU raise it (256+) together with batch_max_tokens."
    )
    batch_max_tokens: int = Field(
        8192, ge=16, description="Token budget of one batch, counted padded (items x longest). "
        "Bounds inference memory and time of one batch."
    )
    batch_max_wait_ms: int = Field(
        20, ge=0, description="Longest an event waits for its batch to fill. The latency "
        "floor under light load; 0 sends whatever has arrived."
    )
    max_poll_records: int = Field(
        512, ge=1, description="Most records one consumer poll returns."
    )
    queue_depth: int = Field(
        4, ge=1, description="Batches in flight between stages (decode, inference, store). "
        "More smooths bursts; each holds a batch in memory."
    )

    # --- Service -----------------------------------------------------------
    processes: int = Field(
        1, ge=1, description="Worker processes on this host, all in one consumer group."
    )
    metrics_host: str = Field("0.0.0.0", description="Address the metrics/health server binds.")
    metrics_port: int = Field(
        9400, ge=0, le=65535, description="Port of /metrics, /healthz, /readyz (0: off). "
        "With several processes, process i serves on metrics_port + i."
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, time to finish the in-flight batches before "
        "abandoning them uncommitted (they are redelivered)."
    )
    log_level: str = Field("INFO", description="Logging level of the entry points.")

    # --- Results stream ----------------------------------------------------
    publish_results: bool = Field(
        False, description="After each batch is stored, publish one record per event to "
        "topic_results ('embedding ready'). Off by default: costs one produce round trip per batch."
    )
    topic_results: str = Field(
        "embedstream.results", description="Topic of 'embedding ready' records (publish_results)."
    )
    results_include_vector: bool = Field(
        False, description="Put the vector (a JSON list of floats) in each results record. "
        "Off: consumers read it from Redis by the record's 'key'."
    )
    metadata_schema: dict[str, Literal["tag", "numeric"]] = Field(
        default_factory=dict,
        description="Metadata fields to index for search filters, for every model, e.g. "
        "'{\"lang\": \"tag\", \"year\": \"numeric\"}'. A model's manifest may add its own "
        "(extra.metadata_schema). Adding a field to an existing index re-indexes it in the background.",
    )

    # --- Gateway -----------------------------------------------------------
    gateway_host: str = Field("0.0.0.0", description="Address the HTTP gateway binds.")
    gateway_port: int = Field(8080, ge=0, le=65535, description="Port of the HTTP gateway.")
    gateway_max_request_bytes: int = Field(
        8 << 20, ge=1024, description="Largest request body the gateway reads (413 above). "
        "Bounds the memory one request can take."
    )
    gateway_max_events: int = Field(
        1000, ge=1, description="Most envelopes in one ingest request (413 above)."
    )
    max_event_bytes: int = Field(
        1 << 20, ge=1024, description="Largest encoded envelope (the Kafka record value). Keep it "
        "under the broker's message.max.bytes; base64 makes binary files 4/3 larger."
    )
    gateway_api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="API keys the gateway accepts (X-API-Key header or 'Authorization: Bearer'). "
        "Empty with no keys file: no auth. Env: JSON list. Never logged.",
    )
    gateway_api_keys_file: Path | None = Field(
        None, description="File of API keys, one per line ('#' comments), read at start; "
        "adds to gateway_api_keys. Mount a secret here in Kubernetes."
    )
    gateway_publish_timeout_s: float = Field(
        10.0, gt=0, description="How long an ingest request waits for the broker to confirm "
        "its events before answering 429 (the 202 means: in Kafka)."
    )
    gateway_buffer_bytes: int = Field(
        32 << 20, ge=1 << 20, description="Memory of the gateway's producer buffer. When it is "
        "full (the broker is slower than the clients) ingest answers 429."
    )
    gateway_retry_after_s: int = Field(
        2, ge=1, description="Retry-After seconds the gateway suggests with a 429."
    )
    gateway_search_max_k: int = Field(100, ge=1, description="Largest k a search may ask for.")
    gateway_search: bool = Field(
        True, description="Serve the search API and page (loads the models in model_dir). "
        "Off: an ingest-only gateway that needs no models."
    )

    @field_validator("auto_offset_reset")
    @classmethod
    def _offset_reset(cls, value: str) -> str:
        if value not in ("earliest", "latest"):
            raise ValueError("auto_offset_reset must be 'earliest' or 'latest'")
        return value

    def topic_for(self, modality: str) -> str:
        """The input topic of a modality."""
        return {"text": self.topic_text, "image": self.topic_image, "audio": self.topic_audio}[
            modality
        ]

    def api_keys(self) -> list[str]:
        """Every accepted gateway API key (settings list plus the keys file)."""
        keys = [k.get_secret_value() for k in self.gateway_api_keys]
        if self.gateway_api_keys_file is not None:
            lines = self.gateway_api_keys_file.read_text(encoding="utf-8").splitlines()
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        return [k for k in keys if k]

    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap.split(",") if s.strip()]
