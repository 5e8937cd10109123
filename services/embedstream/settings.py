"""One typed settings object, built at the entry point and passed down.

Every field reads from an environment variable ``EMBEDSTREAM_<FIELD>`` (for
example ``EMBEDSTREAM_KAFKA_BOOTSTRAP``); command-line flags override the
environment. Secrets can also come from files: ``EMBEDSTREAM_<FIELD>_FILE``
names a file whose content (trailing newline stripped) is the value, the
convention of Docker and Kubernetes secrets. Nothing in the package reads the
environment anywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from embedstream.sections import GatewaySettings, KafkaSettings, PayloadSettings, RedisSettings

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
    kafka_client: Literal["kafka-python", "confluent"] = Field(
        "kafka-python", description="Kafka client library of the worker's consumer, dead "
        "letters and results stream, the gateway's publisher and 'produce' ('replay' uses "
        "kafka-python): 'kafka-python' (pure Python, always installed) or 'confluent' "
        "(confluent-kafka, librdkafka; install the 'confluent' extra). Both keep the same "
        "guarantees; 'confluent' costs less CPU per record, which matters at GPU rates "
        "(README, Performance: Kafka client ceilings)."
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
    kafka_fetch_max_wait_ms: int = Field(
        50, ge=0, le=1000, description="Longest the broker may hold a fetch that has no data "
        "yet. Some brokers (Tansu) hold it this long even when data arrives, so it adds up to "
        "this much latency at low load; Kafka answers as soon as data arrives. Lower: less "
        "latency, more idle fetch requests."
    )
    kafka_max_partition_fetch_bytes: int = Field(
        8 << 20, ge=1 << 16, description="Most bytes one fetch takes from one partition. "
        "Image and audio events are hundreds of KB: at Kafka's 1 MiB default a poll brings "
        "two or three per partition, too few to fill a batch. Memory: up to this much per "
        "assigned partition is buffered."
    )
    auto_offset_reset: str = Field(
        "earliest", description="Where a new group starts: 'earliest' or 'latest'."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How clients talk to the brokers."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism with SASL_PLAINTEXT / SASL_SSL."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user.")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="SASL password (or EMBEDSTREAM_KAFKA_SASL_PASSWORD_FILE). Never logged."
    )
    kafka_ssl_cafile: Path | None = Field(None, description="CA bundle that signs the brokers.")
    kafka_ssl_certfile: Path | None = Field(None, description="Client certificate (mutual TLS).")
    kafka_ssl_keyfile: Path | None = Field(None, description="Client private key (mutual TLS).")

    # --- Redis -------------------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL (redis:// or rediss:// for TLS)."
    )
    redis_username: str | None = Field(
        None, description="Redis ACL user; overrides one in the URL."
    )
    redis_password: SecretStr | None = Field(
        None, description="Redis password (or EMBEDSTREAM_REDIS_PASSWORD_FILE); overrides one "
        "in the URL. Never logged."
    )
    redis_ssl_ca_file: Path | None = Field(
        None, description="CA bundle for rediss:// URLs (default: the system's)."
    )
    redis_socket_timeout_s: float = Field(
        5.0, gt=0, description="Longest one Redis call may take before it counts as a "
        "transient failure (and is retried by the worker's own backoff; redis-py's retries "
        "are off, so the two never stack). Keep it well under shutdown_timeout_s."
    )
    redis_cluster: Literal["auto", "yes", "no"] = Field(
        "auto", description="Whether redis_url names a node of a Redis Cluster: 'auto' asks "
        "the server (INFO cluster) when connecting, 'yes'/'no' skip the question (a worker "
        "that starts while Redis is away takes 'no' under 'auto'). In a cluster the client "
        "follows slots, writes go as one pipeline per master, and a document's keys carry "
        "its id as a hash tag (<prefix>:<model>:{<id>}) so all its chunks share a slot."
    )
    redis_cluster_search: Literal["auto", "coordinator", "shards"] = Field(
        "auto", description="How a cluster searches: 'coordinator' (the query engine's "
        "coordinator, e.g. Redis 8: one FT.CREATE and one FT.SEARCH for the cluster), "
        "'shards' (no coordinator: each master indexes its own keys under a hash-tagged "
        "index name whose slot it owns, and search asks every master and merges the top "
        "k), 'auto' (coordinator when the server has its shard-local _FT.SEARCH command)."
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

    # --- Vector index (applied when a model's index is created) -------------
    # A model's manifest may override any of these (extra.index). An existing index keeps
    # what it was created with; asking for other values explicitly is refused with how to
    # roll out to a new index (README, Results in Redis: index settings).
    index_algorithm: Literal["HNSW", "FLAT", "SVS-VAMANA"] = Field(
        "HNSW", description="Vector index algorithm. HNSW: approximate, fast queries at any "
        "size. FLAT: exact, fast writes, but every query scans every vector (and blocks Redis "
        "meanwhile). SVS-VAMANA: Redis 8.2 or later only (not the embedded dev stack)."
    )
    index_vector_type: Literal["FLOAT32", "FLOAT16"] = Field(
        "FLOAT32", description="Type of the indexed (and stored) vectors. FLOAT16 halves "
        "their memory; queries are sent in the index's type automatically."
    )
    index_m: int = Field(
        16, ge=1, le=512, description="HNSW M: edges per node and layer (2M on the base "
        "layer). More: better recall, more memory and slower writes. SVS-VAMANA: "
        "GRAPH_MAX_DEGREE = 2 x this."
    )
    index_ef_construction: int = Field(
        64, ge=1, le=4096, description="HNSW EF_CONSTRUCTION: candidates considered per "
        "insert. The main cost of a write into a large index: lower writes faster and "
        "needs a higher index_ef_runtime for the same recall. SVS-VAMANA: "
        "CONSTRUCTION_WINDOW_SIZE."
    )
    index_ef_runtime: int = Field(
        100, ge=1, le=4096, description="HNSW EF_RUNTIME: candidates considered per query "
        "(the index's default for every KNN query; at least k is used). Higher: better "
        "recall, slower queries; costs writes nothing. SVS-VAMANA: SEARCH_WINDOW_SIZE."
    )

    # --- Models ------------------------------------------------------------
    model_dir: Path = Field(
        Path("models"), description="Root folder of model directories (one per model)."
    )
    default_text_model: str = Field(
        "all-minilm-l6-v2", description="Model of text events that name none."
    )
    default_image_model: str = Field(
        "efficientnet-lite0", description="Model of image events that name none (when served; "
        "otherwise the first image model by name)."
    )
    default_audio_model: str = Field(
        "aisfx", description="Model of audio events that name none (when served; otherwise "
        "the first audio model by name)."
    )
    models: list[str] = Field(
        default_factory=list,
        description="Models the worker loads at start (default: every model in model_dir). "
        "Env: JSON list, e.g. '[\"all-minilm-l6-v2\"]'.",
    )
    backend: str = Field(
        "onnxruntime", description="Model backend, by name in embedstream.runtime.registry "
        "(BACKENDS): what runs every model's graph. 'onnxruntime' is the one built in; a new "
        "runtime registers there and is chosen here."
    )
    providers: list[str] = Field(
        default_factory=list,
        description="ONNX Runtime execution providers in order of preference, e.g. "
        "'[\"CUDAExecutionProvider\"]'. Empty: the best available (TensorRT, CUDA, CPU).",
    )
    inference_instances: int = Field(
        0, ge=0, description="Model instances per process, each with its own ONNX Runtime "
        "session and inference thread, splitting intra_op_threads between them: batches run "
        "side by side instead of one at a time. 0 (auto): 2 on CPU when the process has 2 or "
        "more threads, else 1; 1 on a GPU. On the 2-core bench machine 2 x 1 thread took the "
        "pipeline from 0.92x to 0.93x (fp32) and 0.84x to 0.95x (int8) of the raw model's "
        "rate, at about 1.7x the peak memory; a batch alone then takes twice as long. "
        "Memory: one copy of the weights and one activation arena per instance."
    )
    intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads per worker process. 0: the cores this "
        "process is given (cores / processes). Set it to the cores in the pod's CPU limit."
    )

    # --- Payloads and input limits -----------------------------------------
    payload_max_inline_bytes: int = Field(
        8 << 20, ge=1024, description="Largest binary payload carried in the record itself, "
        "decoded: a 'data' field (base64) or a raw-bytes record value. Larger files travel by "
        "'uri'. Keep it under the broker's message.max.bytes (base64 adds a third)."
    )
    uri_roots: list[Path] = Field(
        default_factory=list, description="Folders 'file://' URIs may point into (after "
        "resolving symlinks). Empty: no file:// fetching. Env: JSON list of paths."
    )
    uri_allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts (exact names, optionally host:port) that "
        "'http(s)://' URIs may name, redirects included. Empty: no HTTP fetching."
    )
    uri_allow_private_networks: bool = Field(
        False, description="Let http(s) URIs reach loopback, private (10/8, 172.16/12, "
        "192.168/16, fc00::/7), link-local (169.254/16, cloud metadata) and other non-public "
        "addresses. Off: an allowed host name that resolves there is refused (uri_forbidden)."
    )
    fetch_max_bytes: int = Field(
        64 << 20, ge=1024, description="Largest file fetched by URI; larger is rejected "
        "(payload_too_large) without reading the rest."
    )
    fetch_timeout_s: float = Field(
        10.0, gt=0, description="Time limit of one URI fetch (connect and the whole body). "
        "Fetches run in the decode stage, so a slow store slows the pipeline: keep it short."
    )
    image_max_pixels: int = Field(
        40_000_000, ge=1, description="Largest image (width x height) decoded; checked from "
        "the header before decoding, so decompression bombs cost nothing (image_too_large)."
    )
    audio_max_seconds: float = Field(
        600.0, gt=0, description="Longest audio clip decoded; checked from the header where the "
        "format gives the length (audio_too_long)."
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
    batch_max_padding: float = Field(
        1.5, description="Most padded / real tokens in one batch (0: no limit). A batch closes "
        "rather than pad short texts to a long one; matters under light load, when a poll "
        "brings few items of mixed lengths. Lower is less waste but smaller batches.",
    )
    batch_max_wait_ms: int = Field(
        20, ge=0, description="Longest an event waits for its batch to fill. The latency "
        "floor under light load; 0 sends whatever has arrived."
    )
    max_poll_records: int = Field(
        512, ge=1, description="Most records one consumer poll returns."
    )
    warmup: bool = Field(
        True, description="Before consuming, run one batch per model of the largest shape "
        "the batch budgets allow, so memory reaches its high-water mark at startup (a "
        "budget too big for the node fails there) instead of on the first burst of long "
        "inputs. Costs about one batch time per model at startup."
    )
    batch_sort_window: int = Field(
        2048, ge=1, description="Most text records sorted by length together. Under a "
        "backlog, polls that queued while inference was busy are drained into one window, "
        "so batches pack texts of similar length (less padding; measured ~9% less "
        "inference time on the bench texts than sorting one 512-record poll at a time). "
        "Raises the records in flight to the window plus two polls. Audio polls merge "
        "too, up to 4 batches' worth (min of this and 4 x batch_max_items); image polls "
        "never do: their inputs have one size.",
    )
    queue_depth: int = Field(
        4, ge=1, description="Batches in flight between stages (decode, inference, store). "
        "More smooths bursts; each holds a batch in memory."
    )

    # --- Limits ------------------------------------------------------------
    max_payload_bytes: int = Field(
        1 << 20, ge=1024, description="Largest record value accepted; larger ones are "
        "dead-lettered (payload_too_large)."
    )
    max_text_chars: int = Field(
        100_000, ge=1, description="Longest text accepted before tokenizing (text_too_long); "
        "bounds tokenizer time and memory."
    )
    text_overflow: Literal["chunk", "truncate", "reject"] = Field(
        "chunk", description="Text over the model's token limit: 'chunk' (split into windows "
        "of at most chunk_tokens with the model's own tokenizer, preferring paragraph and "
        "sentence boundaries; each window is a vector of its own, all of them replaced or "
        "deleted together), 'truncate' (the first window only; counted) or 'reject' "
        "(dead-lettered as text_too_long)."
    )
    chunk_tokens: int = Field(
        0, ge=0, description="Most tokens of one chunk, special tokens included (0: the "
        "model's limit, 256 for MiniLM). Smaller chunks: more precise hits, more vectors."
    )
    chunk_overlap: float = Field(
        0.15, ge=0, lt=0.9, description="Fraction of chunk_tokens that a chunk repeats of "
        "the one before it, so a fact cut by a boundary is whole in one of them."
    )
    tombstone_retention_s: int = Field(
        7 * 24 * 3600, ge=60, description="How long a delete's marker (its id and version) "
        "is kept: a replay of an upsert older than the delete cannot bring the item back "
        "within it. Longer: safer replays of old history; each marker is ~100 bytes."
    )
    metadata_max_fields: int = Field(
        256, ge=0, description="Most metadata fields one event may carry "
        "(metadata_too_large above). Each becomes a hash field in Redis."
    )
    metadata_max_bytes: int = Field(
        64 << 10, ge=0, description="Most UTF-8 bytes of one event's metadata names and "
        "values together (metadata_too_large above)."
    )
    dlq_max_record_bytes: int = Field(
        1_000_000, ge=16 << 10, description="Largest dead letter the worker produces (the "
        "dead-letter producer's request limit; keep it under the broker's message.max.bytes). "
        "A record too large to copy within it is dead-lettered as a reference to its "
        "source position (header embedstream.value: reference) instead of a copy."
    )
    max_in_flight_bytes: int = Field(
        64 << 20, ge=1 << 16, description="Payload bytes consumed but not yet stored before the "
        "consumer pauses: bounds the worker's batch memory."
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
    commit_interval_ms: int = Field(
        1000, ge=0, description="How often finished offsets are committed (and always on a "
        "revoke and at shutdown). Longer: fewer commit round trips; shorter: less work "
        "redone after a crash. 0 commits at every loop pass."
    )
    liveness_timeout_s: float = Field(
        60.0, gt=0, description="/healthz fails when a stage has had work for this long "
        "without progress (a hung inference call, a wedged write), so Kubernetes restarts "
        "the pod. Waiting out an unreachable broker or Redis is progress of its own (each "
        "retry counts) and only makes the worker not ready. Keep it above the slowest "
        "batch and fetch_timeout_s."
    )
    poison_max_deaths: int = Field(
        3, ge=2, description="Crash-loop breaker: worker processes that may die with a "
        "partition stuck at one offset before the record that kills them is quarantined "
        "(dead-lettered as poison_quarantined, never processed again). After this many "
        "deaths minus one, the next owner processes that partition's backlog one record at "
        "a time (a few ms each), so the next death names the record in hand; its successor "
        "quarantines it. 2 quarantines sooner but makes every single crash (an OOM kill, a "
        "lost node) cost a slow pass over up to a process's in-flight records. The marks "
        "live in Redis."
    )
    restart_backoff_max_s: float = Field(
        60.0, gt=0, description="With --processes: a crashed worker process is restarted "
        "after 1 s, doubling with each crash in a row up to this; a process that ran for a "
        "minute resets it."
    )

    # --- Model set and rollouts --------------------------------------------
    control_poll_s: float = Field(
        1.0, gt=0, description="How often workers and gateways read the control document in "
        "Redis (announced models, rollouts). A change reaches every worker within about this "
        "long; each read is one small GET."
    )
    rollout_grace_s: float = Field(
        600.0, ge=0, description="After 'rollout promote', how long OLD's vectors are kept "
        "before a worker deletes them. Queries already embedded with OLD finish meanwhile; "
        "longer costs OLD's memory for longer."
    )
    rollout_backfill_rate: float = Field(
        200.0, ge=0, description="Most records per second the backfill of a rollout re-embeds "
        "(0: no limit). The backfill is a process of its own: this keeps it from taking the "
        "CPU (or GPU) the live workers need. Backfill time is about retained records / rate."
    )
    rollout_ack_timeout_s: float = Field(
        60.0, gt=0, description="How long 'rollout start', 'promote' and 'abort' wait for "
        "every live worker to pick up the change (load NEW, switch routing) before failing."
    )

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
    results_cloudevents: Literal["off", "binary", "structured"] = Field(
        "off", description="Emit results records as CloudEvents (Kafka protocol binding): "
        "'binary' adds ce_* headers to the same JSON value; 'structured' makes the value an "
        "application/cloudevents+json event with the record in 'data'. Type "
        "io.embedstream.embedding.stored or .deleted, subject the event id."
    )
    metadata_schema: dict[str, Literal["tag", "numeric"]] = Field(
        default_factory=dict,
        description="Metadata fields to index for search filters, for every model, e.g. "
        "'{\"lang\": \"tag\", \"year\": \"numeric\"}'. A model's manifest may add its own "
        "(extra.metadata_schema). Adding a field to an existing index re-indexes it in the background.",
    )

    # --- Gateway -----------------------------------------------------------
    gateway_host: str = Field(
        "127.0.0.1", description="Address the HTTP gateway binds. Loopback by default; a "
        "non-loopback address (0.0.0.0 in a container) needs API keys or "
        "gateway_allow_anonymous, or the gateway refuses to start."
    )
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
        description="API keys the gateway accepts (X-API-Key header or 'Authorization: Bearer'), "
        "each a line of the keys-file format (README, Gateway security): the key or its "
        "salted hash, then optional scopes=, tenant=, rate=, burst=, name=. Env: JSON list. "
        "Never logged.",
    )
    gateway_api_keys_file: Path | None = Field(
        None, description="File of API keys, one a line in the same format ('#' comments); "
        "adds to gateway_api_keys and is re-read when it changes (a Kubernetes Secret "
        "mounted here updates without a restart)."
    )
    gateway_api_keys_reload_s: float = Field(
        5.0, gt=0, description="How often (at most) the gateway looks whether the keys file "
        "changed. A revoked key stops working within this time."
    )
    gateway_allow_anonymous: bool = Field(
        False, description="Serve without API keys on a non-loopback address (every request "
        "gets every scope, no tenant). Off: the gateway refuses to start open. Logged as a "
        "warning at every start."
    )
    gateway_rate_limit: float = Field(
        0.0, ge=0, description="Requests per second each key may make (token bucket; 429 with "
        "Retry-After above it); a key's own rate= overrides it. 0: no limit. Anonymous "
        "requests share one bucket."
    )
    gateway_rate_burst: int = Field(
        0, ge=0, description="Requests a key may make at once before its rate applies "
        "(bucket size; a key's burst= overrides it). 0: twice the rate, at least 1."
    )
    tenant_from: Literal["none", "header", "envelope"] = Field(
        "none", description="Where an event on Kafka names its tenant (the worker stores it as "
        "the system field 'tenant'; searches of a tenant's keys see only that tenant's items). "
        "'none': events have no tenant, and one that names a tenant is dead-lettered; "
        "'header': the record header embedstream.tenant (what the gateway writes for a "
        "tenant-bound key); 'envelope': that header or the envelope's 'tenant' field. Kafka "
        "ACLs decide who may produce, so allow it only where every producer on the topics "
        "may name any tenant. Set the same value on workers and gateway."
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

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit values (CLI flags), then the env, then *_FILE secrets.
        return (init_settings, env_settings, _SecretFiles(settings_cls), file_secret_settings)

    # The sections: typed views handed to components (see embedstream.sections).

    @property
    def kafka(self) -> KafkaSettings:
        return KafkaSettings.of(self)

    @property
    def redis(self) -> RedisSettings:
        return RedisSettings.of(self)

    @property
    def payloads(self) -> PayloadSettings:
        return PayloadSettings.of(self)

    @property
    def gateway(self) -> GatewaySettings:
        return GatewaySettings.of(self)

    def topic_for(self, modality: str) -> str:
        """The input topic of a modality."""
        return self.kafka.topic_for(modality)

    def default_model_for(self, modality: str) -> str:
        """The configured default model of a modality (the one place that maps the
        per-modality fields back; routing applies it to the models actually served)."""
        return {"text": self.default_text_model, "image": self.default_image_model,
                "audio": self.default_audio_model}[modality]


class _SecretFiles(PydanticBaseSettingsSource):
    """``EMBEDSTREAM_<FIELD>_FILE`` -> the file's content, for secret fields."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field.annotation not in (SecretStr, SecretStr | None):
            return None, field_name, False
        path = os.environ.get(f"EMBEDSTREAM_{field_name.upper()}_FILE")
        if not path:
            return None, field_name, False
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n"), field_name, False
        except OSError as err:
            raise ValueError(f"cannot read EMBEDSTREAM_{field_name.upper()}_FILE: {err}") from err

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(field, name)
            if value is not None:
                values[key] = value
        return values
