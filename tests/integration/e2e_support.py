"""Helpers shared by the integration tests: settings per test, a worker on a thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import redis
from kafka import KafkaConsumer

from embedstream.metrics import Metrics
from embedstream.settings import Settings
from embedstream.sinks.redis import result_key
from embedstream.worker.service import build_worker

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


def wait_for(condition, timeout: float = 60.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


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


