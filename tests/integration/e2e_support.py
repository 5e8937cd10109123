"""Helpers shared by the integration tests: settings per test, a worker on a thread."""

from __future__ import annotations

import threading
from pathlib import Path

import redis
from kafka import KafkaConsumer, TopicPartition

from embedstream.metrics import Metrics
from embedstream.settings import Settings
from embedstream.sinks.redis import result_key
from embedstream.worker.service import build_worker
from support.stack import wait_for

__all__ = ["MODEL", "ThreadWorker", "dead_letters", "make_settings", "partition_ends",
           "stored_ids", "wait_for", "worker_env_vars"]

MODEL = "all-minilm-l6-v2"


def make_settings(stack, unique: str, model_root: Path, **extra) -> Settings:
    return Settings(
        kafka_bootstrap=stack.bootstrap,
        redis_url=stack.redis_url,
        topic_text=f"{unique}.text",
        topic_dlq=f"{unique}.dlq",
        group_id=f"{unique}-group",
        key_prefix=unique,
        model_dir=model_root,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        metrics_port=0,
        topic_partitions=4,
        # The startup warm-up (a full batch of 256-token texts, ~2 s here) is covered by
        # the unit tests and every worker process the bench and the demo start.
        warmup=False,
        **extra,
    )



def stored_ids(client: redis.Redis, prefix: str) -> set[str]:
    """Ids of the documents stored under ``prefix`` (chunk 0's keys; ids without % or #)."""
    pattern = result_key(prefix, MODEL, "*")
    keys = (k.decode().rsplit(":", 1)[-1] for k in client.scan_iter(match=pattern, count=1000))
    return {key for key in keys if "#" not in key}


def dead_letters(settings: Settings, expected: int) -> list:
    consumer = KafkaConsumer(
        settings.topic_dlq, bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=5000,
        group_id=None,
    )
    out = []
    for record in consumer:
        out.append(record)
        if len(out) >= expected:
            break
    consumer.close()
    return out


class ThreadWorker:
    """A real worker running in this process, on a thread."""

    def __init__(self, settings: Settings) -> None:
        self.metrics = Metrics()
        self.worker = build_worker(settings, self.metrics)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.code = self.worker.run()

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def stop(self) -> int | None:
        self.worker.stop()
        self.thread.join(60)
        return self.code


def partition_ends(bootstrap: str, topic: str, partitions: int) -> dict[TopicPartition, int]:
    """One past the last offset of each partition, found by reading it.

    (Tansu's ListOffsets(latest) answers a wrong end offset, so end_offsets()
    cannot be used against the embedded broker; fetched records are right.)
    """
    parts = [TopicPartition(topic, p) for p in range(partitions)]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             consumer_timeout_ms=3000)
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    ends = dict.fromkeys(parts, 0)
    for record in consumer:
        tp = TopicPartition(record.topic, record.partition)
        ends[tp] = max(ends[tp], record.offset + 1)
    consumer.close()
    return ends


def worker_env_vars(settings: Settings) -> dict[str, str]:
    """The environment variables that point a worker process at ``settings``' broker,
    Redis, topics and models, on one thread with quick group timeouts."""
    return {
        "EMBEDSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "EMBEDSTREAM_REDIS_URL": settings.redis_url,
        "EMBEDSTREAM_TOPIC_TEXT": settings.topic_text,
        "EMBEDSTREAM_TOPIC_DLQ": settings.topic_dlq,
        "EMBEDSTREAM_GROUP_ID": settings.group_id,
        "EMBEDSTREAM_KEY_PREFIX": settings.key_prefix,
        "EMBEDSTREAM_MODEL_DIR": str(settings.model_dir),
        "EMBEDSTREAM_SESSION_TIMEOUT_MS": "6000",
        "EMBEDSTREAM_HEARTBEAT_INTERVAL_MS": "1000",
        "EMBEDSTREAM_INTRA_OP_THREADS": "1",
    }
