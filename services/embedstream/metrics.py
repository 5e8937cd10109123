"""Every Prometheus metric of embedstream, in one place.

One prefix (``embedstream_``), one failure counter with a bounded ``reason``
label (the codes of :data:`embedstream.envelope.REASONS`), one histogram per
pipeline stage. Instruments live on a :class:`Metrics` object bound to a
registry, so tests and several workers in one process do not share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "embedstream"
STAGES = ("decode", "tokenize", "preprocess", "inference", "sink", "commit")

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    """The worker's instruments. Create one per registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.consumed = Counter(
            f"{PREFIX}_events_consumed", "Records consumed from input topics.", ["topic"],
            registry=reg,
        )
        self.embedded = Counter(
            f"{PREFIX}_events_embedded",
            "Events embedded and stored (new, or a newer version of their id).",
            ["model"],
            registry=reg,
        )
        self.duplicates = Counter(
            f"{PREFIX}_events_duplicate",
            "Redelivered events whose version was already stored (at-least-once replays).",
            ["model"],
            registry=reg,
        )
        self.stale = Counter(
            f"{PREFIX}_events_stale",
            "Events older than the stored version of their id; the newer one was kept.",
            ["model"],
            registry=reg,
        )
        self.failed = Counter(
            f"{PREFIX}_events_failed",
            "Events rejected to the dead-letter topic, by reason.",
            ["reason"],
            registry=reg,
        )
        self.deleted = Counter(
            f"{PREFIX}_events_deleted",
            "Deletes applied (tombstones and op: delete), per model; a delete of an id not "
            "stored counts too (its marker keeps older writes out).",
            ["model"],
            registry=reg,
        )
        self.chunks = Counter(
            f"{PREFIX}_chunks_stored",
            "Chunks of documents split into several (a text over its model's token limit).",
            ["model"],
            registry=reg,
        )
        self.truncated = Counter(
            f"{PREFIX}_events_truncated",
            "Text events cut to the model's token limit.",
            ["model"],
            registry=reg,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Events per inference batch.", ["model"],
            buckets=_SIZE_BUCKETS, registry=reg,
        )
        self.batch_tokens = Histogram(
            f"{PREFIX}_batch_tokens",
            "Padded tokens per inference batch (items x longest).",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=reg,
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_seconds",
            "Time spent in each pipeline stage, per batch (decode and tokenize per poll).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.end_to_end_seconds = Histogram(
            f"{PREFIX}_end_to_end_seconds",
            "From the record's Kafka timestamp to its embedding stored in Redis.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.consumer_lag = Gauge(
            f"{PREFIX}_consumer_lag",
            "Records behind the end of each assigned partition.",
            ["topic", "partition"],
            registry=reg,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_events_in_flight",
            "Events consumed but not yet stored or dead-lettered (uncommitted).",
            registry=reg,
        )
        self.sink_retries = Counter(
            f"{PREFIX}_sink_retries", "Redis writes retried after a transient error.", registry=reg
        )
        self.commits = Counter(f"{PREFIX}_commits", "Offset commits sent.", registry=reg)
        self.store_full = Counter(
            f"{PREFIX}_store_full",
            "Writes refused because Redis was out of memory (OOM under noeviction); the "
            "worker pauses and retries, committing nothing, until Redis has room.",
            registry=reg,
        )
        self.stage_stalled = Gauge(
            f"{PREFIX}_stage_stalled_seconds",
            "Seconds a stage has held work without progress (0 while idle or progressing); "
            "liveness fails past liveness_timeout_s.",
            ["stage"],
            registry=reg,
        )
        self.careful = Gauge(
            f"{PREFIX}_crash_loop_careful",
            "1 while the worker processes records one at a time after worker processes died "
            "at the same offset (the crash-loop breaker).",
            registry=reg,
        )
        self.ready = Gauge(
            f"{PREFIX}_ready", "1 when models are loaded and the consumer and Redis answer.",
            registry=reg,
        )
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "Loaded models (value 1) with their dimension and execution provider.",
            ["model", "modality", "dimension", "provider"],
            registry=reg,
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)


GATEWAY_ROUTES = ("ingest", "search", "embedding", "delete", "models", "page", "health", "metrics",
                  "docs", "other")


class GatewayMetrics:
    """The HTTP gateway's instruments (same prefix; ``route`` is a route name, not a path)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            f"{PREFIX}_gateway_requests", "HTTP requests answered, by route and status code.",
            ["route", "status"], registry=reg,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_gateway_request_seconds", "Time to answer a request, by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=reg,
        )
        self.accepted = Counter(
            f"{PREFIX}_gateway_events_accepted",
            "Events confirmed by the broker and answered 202, by modality.",
            ["modality"], registry=reg,
        )
        self.rejected = Counter(
            f"{PREFIX}_gateway_events_rejected",
            "Ingest requests refused before Kafka, by reason (envelope reason codes, "
            "too_large, unsupported_media_type, unauthorized, backpressure).",
            ["reason"], registry=reg,
        )
        self.broker_ready = Gauge(
            f"{PREFIX}_gateway_broker_ready", "1 while the gateway's producer is connected.",
            registry=reg,
        )
