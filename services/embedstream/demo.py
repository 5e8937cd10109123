"""``embedstream demo``: the whole pipeline end to end on the embedded stack.

Exports the default model if needed, starts the embedded broker and Redis on
free loopback ports, runs a real worker process, produces the sample
sentences plus a few bad events, waits until every good event is stored and
every bad one dead-lettered, searches, and shuts everything down. Exit code 0
only if every event ended where it should.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

from embedstream import devstack
from embedstream.errors import EmbedstreamError
from embedstream.models.manifest import find_models
from embedstream.settings import Settings

DEMO_QUERY = "rockets and satellites in orbit"
BAD_EVENTS = [b"{this is not json", b'{"id": "empty-1", "text": "  "}', b"\xff\xfe\x00 binary"]


def sample_sentences(limit: int) -> list[str]:
    text = resources.files("embedstream").joinpath("data/sample_sentences.txt").read_text("utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    if limit > len(lines):  # more than the file holds: number the repeats so each is unique
        lines = [f"{lines[i % len(lines)]} (#{i})" for i in range(limit)]
    return lines[:limit]


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def ensure_model(settings: Settings) -> None:
    if settings.default_text_model in find_models(settings.model_dir):
        say(f"model {settings.default_text_model} found in {settings.model_dir}/")
        return
    say(f"exporting {settings.default_text_model} to {settings.model_dir}/ (first run only)")
    try:
        from embedstream.export import default_text_checkpoint, export_text_model
    except ImportError as err:
        raise EmbedstreamError(
            "exporting needs the export extra: pip install 'embedstream[export]'"
        ) from err
    export_text_model(default_text_checkpoint(), settings.model_dir, settings.default_text_model)


def run_demo(settings: Settings, events: int = 300) -> int:
    ensure_model(settings)
    cfg = devstack.DevStackConfig.on_free_ports(Path(".devstack") / "demo")
    say(f"starting the embedded stack: broker {cfg.bootstrap}, redis {cfg.redis_url}")
    with devstack.embedded_stack(cfg):
        demo = settings.model_copy(
            update={
                "kafka_bootstrap": cfg.bootstrap,
                "redis_url": cfg.redis_url,
                "metrics_port": devstack.free_port(),
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
            }
        )
        return _run(demo, events)


def _run(settings: Settings, events: int) -> int:
    from embedstream.producer import Producer
    from embedstream.search import search_vector
    from embedstream.sinks.redis import connect

    worker = _start_worker(settings)
    metrics_url = f"http://127.0.0.1:{settings.metrics_port}/metrics"
    try:
        _wait_ready(settings, worker)
        sentences = sample_sentences(events)
        started = time.monotonic()
        with Producer(settings) as producer:
            for i, sentence in enumerate(sentences):
                producer.send_text(sentence, id=f"demo-{i}", metadata={"dataset": "demo"})
            for bad in BAD_EVENTS:
                producer.send_raw(settings.topic_text, None, bad)
            producer.flush()
        say(f"produced {len(sentences)} sentences and {len(BAD_EVENTS)} bad events "
            f"to {settings.topic_text}")
        stored, dead = _wait_done(metrics_url, len(sentences), len(BAD_EVENTS), worker)
        elapsed = time.monotonic() - started
        say(f"stored {stored}/{len(sentences)} embeddings in Redis in {elapsed:.1f}s "
            f"({stored / elapsed:.0f} events/s end to end); {dead} bad events dead-lettered")

        from embedstream.runtime.loader import load_models

        name = settings.default_text_model
        model = load_models(settings.model_dir, [name], providers=settings.providers,
                            threads=settings.intra_op_threads)[name]
        client = connect(settings)
        keys = sum(1 for _ in client.scan_iter(match=f"{settings.key_prefix}:{name}:*", count=1000))
        hits = search_vector(client, settings.key_prefix, name,
                             model.embed_texts([DEMO_QUERY])[0], k=5)
        say(f"search {DEMO_QUERY!r}:")
        for rank, hit in enumerate(hits, start=1):
            print(f"        {rank}. {hit.score:.3f}  {hit.fields.get('text') or hit.id}")
        say(f"metrics were served at {metrics_url} (also /healthz, /readyz); a sample:")
        for line in _metric_lines(metrics_url):
            print(f"        {line}")
    finally:
        code = _stop_worker(worker)
    ok = stored == len(sentences) == keys and dead == len(BAD_EVENTS) and code == 0
    say(f"worker exited with {code}; stack stopped. "
        + ("OK: every event stored or dead-lettered." if ok else "FAILED: events missing."))
    return 0 if ok else 1


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, "EMBEDSTREAM_SESSION_TIMEOUT_MS": str(settings.session_timeout_ms),
           "EMBEDSTREAM_HEARTBEAT_INTERVAL_MS": str(settings.heartbeat_interval_ms)}
    cmd = [
        sys.executable, "-m", "embedstream", "--log-level", "WARNING", "worker",
        "--kafka-bootstrap", settings.kafka_bootstrap, "--redis-url", settings.redis_url,
        "--model-dir", str(settings.model_dir), "--metrics-port", str(settings.metrics_port),
        "--metrics-host", "127.0.0.1", "--shutdown-timeout-s", "20",
    ]
    say("starting a worker: " + " ".join(cmd[2:]))
    return subprocess.Popen(cmd, env=env)


def _wait_ready(settings: Settings, worker: subprocess.Popen[bytes], timeout: float = 120) -> None:
    url = f"http://127.0.0.1:{settings.metrics_port}/readyz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise EmbedstreamError(f"the worker exited with {worker.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    say("worker ready (model loaded, consumer polling, Redis answering)")
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise EmbedstreamError(f"the worker was not ready within {timeout:.0f}s")


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = values.get(name, 0.0) + float(value)
    return values


def _total(values: dict[str, float], metric: str) -> float:
    return sum(v for k, v in values.items() if re.match(rf"{metric}(\{{|$)", k))


def _wait_done(
    url: str, good: int, bad: int, worker: subprocess.Popen[bytes], timeout: float = 300
) -> tuple[int, int]:
    deadline = time.monotonic() + timeout
    stored = dead = 0
    while time.monotonic() < deadline and worker.poll() is None:
        values = _scrape(url)
        stored = int(_total(values, "embedstream_events_embedded_total"))
        dead = int(_total(values, "embedstream_events_failed_total"))
        if stored + dead >= good + bad:  # every event accounted for, rightly or not
            break
        time.sleep(0.25)
    return stored, dead


def _metric_lines(url: str) -> list[str]:
    values = _scrape(url)
    batches = _total(values, "embedstream_batch_size_count")
    e2e_count = _total(values, "embedstream_end_to_end_seconds_count")
    lines = [
        f"embedstream_events_embedded_total {_total(values, 'embedstream_events_embedded_total'):.0f}",
        f"embedstream_events_failed_total {_total(values, 'embedstream_events_failed_total'):.0f}",
        f"batches {batches:.0f}, mean fill "
        f"{_total(values, 'embedstream_batch_size_sum') / max(batches, 1):.1f} events",
        f"mean end-to-end latency "
        f"{_total(values, 'embedstream_end_to_end_seconds_sum') / max(e2e_count, 1) * 1000:.0f} ms",
    ]
    for name in sorted(values):
        if name.startswith("embedstream_events_failed_total{"):
            lines.append(f"{name} {values[name]:.0f}")
    return lines


def _stop_worker(worker: subprocess.Popen[bytes]) -> int:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            return -9
    return worker.returncode
