"""The pipeline row: broker -> worker process -> Redis, measured from outside.

The worker is a real ``embedstream worker`` process (so its peak RSS is its
own), serving one model with the bench's threads and batch size. Events are
texts, or image and audio files sent inline (base64 ``data`` in the JSON
envelope) to the modality's topic. Two runs:

* throughput: every event is produced *before* the worker starts; the rate is
  counted from the first Redis write to the last (startup and group join
  excluded), from the write time each hash carries (``created_at``);
* latency: events offered at a fixed rate (half the measured maximum by
  default); each stored hash carries ``event_ts`` (the Kafka record's
  create time) and ``created_at`` (the Redis write), their difference is the
  end-to-end latency.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from embedstream import devstack
from embedstream.devstack import free_port
from embedstream.errors import BenchError
from embedstream.producer import Producer
from embedstream.settings import Settings
from embedstream.sinks.cluster import Client, is_cluster
from embedstream.sinks.index import stored_vector
from embedstream.sinks.redis import connect, result_key

_POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class PipelineResult:
    items: int
    seconds: float
    vectors: np.ndarray
    """In input order."""
    mean_batch: float
    peak_rss_mb: float
    latencies_ms: np.ndarray
    offered_per_s: float
    achieved_per_s: float
    """Events stored per second over the latency run: below the offered rate, it overloaded."""
    breakdown: dict[str, float]
    """Where the throughput run's time went (see :func:`_breakdown`)."""


class WorkerProcess:
    """One ``embedstream worker`` subprocess with its metrics endpoint."""

    def __init__(
        self, settings: Settings, model: str, threads: int, batch_size: int,
        modality: str = "text", extra_env: dict[str, str] | None = None,
        text_overflow: str = "truncate",
    ) -> None:
        """``text_overflow`` is ``truncate`` by default: the comparison rows embed what the
        peer embeds, one window per text (``bench --documents`` measures chunking)."""
        self.port = free_port()
        env = {
            **os.environ,
            **(extra_env or {}),
            "EMBEDSTREAM_MODELS": json.dumps([model]),
            f"EMBEDSTREAM_DEFAULT_{modality.upper()}_MODEL": model,
            f"EMBEDSTREAM_TOPIC_{modality.upper()}": settings.topic_for(modality),
            "EMBEDSTREAM_TOPIC_DLQ": settings.topic_dlq,
            "EMBEDSTREAM_GROUP_ID": settings.group_id,
            "EMBEDSTREAM_KEY_PREFIX": settings.key_prefix,
            "EMBEDSTREAM_SESSION_TIMEOUT_MS": "6000",
            "EMBEDSTREAM_HEARTBEAT_INTERVAL_MS": "1000",
            "EMBEDSTREAM_BATCH_MAX_WAIT_MS": str(settings.batch_max_wait_ms),
            "EMBEDSTREAM_TEXT_OVERFLOW": text_overflow,
        }
        cmd = [
            sys.executable, "-m", "embedstream", "--log-level", "WARNING", "worker",
            "--kafka-bootstrap", settings.kafka_bootstrap, "--redis-url", settings.redis_url,
            "--model-dir", str(settings.model_dir), "--metrics-port", str(self.port),
            "--metrics-host", "127.0.0.1", "--intra-op-threads", str(threads),
            "--batch-max-items", str(batch_size), "--processes", "1",
        ]
        self.proc = subprocess.Popen(cmd, env=env)
        self._model = model

    def scrape(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                bare = name.split("{")[0]
                values[bare] = values.get(bare, 0.0) + float(value)
                if bare != name:  # also each labelled series, e.g. stage="inference"
                    values[name] = float(value)
        return values

    def stored(self) -> float:
        try:
            return self.scrape().get("embedstream_events_embedded_total", 0.0)
        except OSError:
            if self.proc.poll() is not None:
                raise BenchError(f"the worker exited with {self.proc.returncode}") from None
            return 0.0

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Wait for ``/readyz`` (model loaded, broker and Redis reachable)."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.port}/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the worker exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise BenchError(f"the worker was not ready within {timeout_s:.0f}s")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def bench_stack(kind: str, redis_shards: int = 1) -> Iterator[devstack.RunningStack]:
    """An embedded broker and Redis for one bench run, on free ports.

    Its state folder is this process's own (``.devstack/<kind>-<pid>``), so two
    benches, or a bench beside ``embedstream dev up``, never share a stack; the
    folder (logs included) is removed after a clean run and kept after a failure.
    """
    cfg = devstack.DevStackConfig.on_free_ports(Path(".devstack") / f"{kind}-{os.getpid()}",
                                                redis_shards=redis_shards)
    with devstack.embedded_stack(cfg) as stack:
        yield stack
    shutil.rmtree(cfg.state_dir, ignore_errors=True)


def run_pipeline(
    base: Settings,
    model: str,
    inputs: list[Any],
    *,
    modality: str = "text",
    threads: int,
    batch_size: int,
    latency_s: float,
    offered_share: float = 0.5,
    timeout_s: float = 600.0,
    stack_pids: dict[str, int] | None = None,
    key_prefix: str | None = None,
    worker_env: dict[str, str] | None = None,
) -> PipelineResult:
    """Throughput then latency of ``model`` through the whole pipeline.

    ``inputs`` are texts (``modality`` "text") or encoded image / audio files.
    ``key_prefix``: store under this prefix (default: one of the run's own), e.g. into
    an index already holding vectors; ``worker_env``: more environment for the worker.
    """
    run = "b" + uuid.uuid4().hex[:8]
    settings = base.model_copy(update={
        "topic_text": f"{run}.text", "topic_image": f"{run}.image",
        "topic_audio": f"{run}.audio", "topic_dlq": f"{run}.dlq", "group_id": f"{run}-group",
        "key_prefix": key_prefix or run,
    })
    ids = [f"{run}-{i}" for i in range(len(inputs))]
    with Producer(settings.kafka, topics=[settings.topic_for(modality)]) as producer:
        for event_id, item in zip(ids, inputs, strict=True):
            _send(producer, modality, item, event_id)
        producer.flush()
    worker = WorkerProcess(settings, model, threads, batch_size, modality, worker_env)
    processes = {"worker": worker.proc.pid, **(stack_pids or {})}
    try:
        # The first write starts the CPU window: caught within 20 ms, before the last one.
        wait_stored(worker, 1, timeout_s, poll_s=0.02)
        cpu_before, wall_before = _cpu_seconds(processes), time.perf_counter()
        wait_stored(worker, len(inputs), timeout_s)
        cpu_after, wall = _cpu_seconds(processes), time.perf_counter() - wall_before
        metrics = worker.scrape()
        mean_batch = metrics.get("embedstream_batch_size_sum", 0.0) / max(
            1.0, metrics.get("embedstream_batch_size_count", 0.0))
        client = connect(settings.redis)
        vectors, written_at = _read_stored(client, settings.key_prefix, model, ids)
        seconds = _seconds_per_run(written_at)
        rate = offered_share * len(inputs) / seconds
        latencies, achieved = _offered_load(
            settings, worker, client, model, modality, inputs, rate, latency_s, timeout_s)
        peak = worker.peak_rss_mb()
    finally:
        worker.stop()
    breakdown = _breakdown(metrics, cpu_before, cpu_after, wall)
    return PipelineResult(len(inputs), seconds, vectors, mean_batch, peak, latencies, rate,
                          achieved, breakdown)


def stack_pids(stack: devstack.RunningStack) -> dict[str, int]:
    """The broker's and Redis's process ids (for their CPU time)."""
    state = stack.status()
    return {svc.name: svc.pid for svc in (state.broker, state.redis) if svc.pid is not None}


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds so far of each process (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _breakdown(
    metrics: dict[str, float], before: dict[str, float], after: dict[str, float], wall: float
) -> dict[str, float]:
    """Cores each process used over the throughput run (first store to last), and the
    worker's stage times over the whole run (inference, decode, tokenize, sink, commit)
    with the padded tokens it computed."""
    out = {"wall_s": wall}
    for name in after:
        out[f"{name}_cores"] = (after[name] - before.get(name, 0.0)) / max(wall, 1e-9)
    for stage in ("decode", "tokenize", "preprocess", "inference", "sink", "commit"):
        key = f'embedstream_stage_seconds_sum{{stage="{stage}"}}'
        if key in metrics:
            out[f"{stage}_s"] = metrics[key]
    out["padded_tokens"] = metrics.get("embedstream_batch_tokens_sum", 0.0)
    return out


def _send(producer: Producer, modality: str, item: Any, event_id: str) -> None:
    if modality == "text":
        producer.send_text(item, id=event_id)
    else:
        producer.send_file(cast(Literal["image", "audio"], modality), data=item, id=event_id)


def wait_stored(
    worker: WorkerProcess, total: float, timeout_s: float, poll_s: float = _POLL_S
) -> None:
    """Wait until the worker has stored ``total`` events.

    Polled slowly on purpose: a metrics scrape costs the worker CPU, and the
    rate comes from the hashes' own write times afterwards, not from here.
    """
    deadline = time.monotonic() + timeout_s
    while worker.stored() < total:
        if time.monotonic() > deadline:
            raise BenchError(
                f"the pipeline stored {worker.stored():.0f}/{total} in {timeout_s:.0f}s")
        time.sleep(poll_s)


def _read_stored(
    client: Client, prefix: str, model: str, ids: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors (in ``ids`` order) and write times (unix seconds) of stored events."""
    pipe = client.pipeline(transaction=False)
    for event_id in ids:
        pipe.hmget(result_key(prefix, model, event_id, tagged=is_cluster(client)),
                   ["embedding", "created_at", "dim"])
    rows = pipe.execute()
    if any(blob is None for blob, _, _ in rows):
        raise BenchError("some events are missing from Redis after the pipeline run")
    vectors = np.stack([stored_vector(blob, int(dim)) for blob, _, dim in rows])
    return vectors, np.array([float(stamp) for _, stamp, _ in rows])


def _seconds_per_run(written_at: np.ndarray) -> float:
    """Seconds to store all events at the rate between the first write and the last.

    Every write (one per batch) stamps its events with one time, so the events of
    the first write mark the start; the rest were stored over the span after it.
    Startup and the group join are excluded this way.
    """
    first = written_at.min()
    after_first = int((written_at > first).sum())
    if after_first == 0:
        raise BenchError("the pipeline run was too short to time; use more items")
    return float(written_at.max() - first) * len(written_at) / after_first


def _offered_load(
    settings: Settings,
    worker: WorkerProcess,
    client: Client,
    model: str,
    modality: str,
    inputs: list[Any],
    rate: float,
    duration_s: float,
    timeout_s: float,
) -> tuple[np.ndarray, float]:
    """Offer events at ``rate``/s for ``duration_s``; return latencies (ms) and the rate stored."""
    count = max(1, int(rate * duration_s))
    before = worker.stored()
    ids = [f"{settings.key_prefix}-lat-{i}" for i in range(count)]
    with Producer(settings.kafka, create_topics=False) as producer:
        start = time.perf_counter()
        for i, event_id in enumerate(ids):
            wait = start + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            _send(producer, modality, inputs[i % len(inputs)], event_id)
        producer.flush()
    deadline = time.monotonic() + timeout_s
    wait_stored(worker, before + count, max(1.0, deadline - time.monotonic()))
    pipe = client.pipeline(transaction=False)
    for event_id in ids:
        pipe.hmget(result_key(settings.key_prefix, model, event_id, tagged=is_cluster(client)),
                   ["created_at", "event_ts"])
    stamps = np.array([(float(c) * 1000, float(e)) for c, e in pipe.execute()])
    span_s = (stamps[:, 0].max() - stamps[:, 1].min()) / 1000
    return stamps[:, 0] - stamps[:, 1], count / max(span_s, 1e-9)
