"""Entry points of the worker: one process, or a supervised pool of processes.

Each process is one consumer-group member with its own models, metrics and
HTTP port (``metrics_port + index``). SIGTERM/SIGINT drain gracefully; a
second signal exits at once (what is in flight stays uncommitted and is
redelivered, like after SIGKILL).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import redis

from embedstream.errors import BrokerUnavailable, EmbedstreamError, StoreUnavailable
from embedstream.metrics import Metrics
from embedstream.models.manifest import find_models
from embedstream.retry import retry
from embedstream.rollout.state import Control, read_control
from embedstream.rollout.watcher import attach, routing_for
from embedstream.runtime.loader import LoadedModel, load_configured
from embedstream.runtime.memory import grew, rss_mb
from embedstream.runtime.onnx import GPU_PROVIDERS, choose_providers, default_threads
from embedstream.runtime.warmup import warm_up
from embedstream.settings import Settings
from embedstream.sinks.redis import STARTUP_BACKOFF, RedisSink, connect, wait_until_answering
from embedstream.sources.registry import kafka_client
from embedstream.worker.http import StatusServer
from embedstream.worker.pipeline import Worker
from embedstream.worker.quarantine import RedisCrashLedger

log = logging.getLogger(__name__)

# Startup waits out a store or broker that does not answer yet (not a refusal).
_WAIT: dict[str, Any] = {
    "transient": (StoreUnavailable, BrokerUnavailable), "backoff": STARTUP_BACKOFF,
    "cancel": threading.Event(),
    "on_retry": lambda err, delay: log.warning("%s: trying again in %.1fs", err, delay),
}


def threads_per_process(settings: Settings) -> int:
    if settings.intra_op_threads:
        return settings.intra_op_threads
    return max(1, default_threads() // settings.processes)


def on_gpu(settings: Settings) -> bool:
    """Whether the worker's sessions run on a GPU provider (the first one that would be tried)."""
    return choose_providers(settings.providers)[0] in GPU_PROVIDERS


def instances_per_process(settings: Settings, threads: int) -> int:
    """Model instances (inference threads) per worker process: ``inference_instances``, or
    when it is 0 (auto), 2 on CPU with at least 2 threads (two threads running 1-thread
    batches lose less to the other stages and to synchronising threads than one thread
    running 2-thread batches), else 1."""
    if settings.inference_instances:
        return settings.inference_instances
    return 1 if on_gpu(settings) or threads < 2 else 2


def load_instances(
    settings: Settings, names: list[str] | None = None
) -> list[dict[str, LoadedModel]]:
    """The models of one worker process (``names``, default ``settings.models``), one
    model set per inference thread, warmed up.

    On CPU the sets share each model's session (weights, tokenizer, activation
    arena): ONNX Runtime runs calls from several threads side by side, so a second
    set holds no weights of its own, and its activations come from the process's
    one arena. Before, each set had its own sessions, and a worker serving MiniLM
    on 2 threads held its weights and its warm-up batch's activations twice. On a
    GPU each set keeps sessions of its own, as before: instances there are for
    overlapping one's host work and copies with another's kernels, and GPU pods
    are not packed by host memory. What each model costs is logged as it loads
    and warms up, and the total once all are ready (every model in the directory
    when none are named).
    """
    started, before = time.perf_counter(), rss_mb()
    threads = threads_per_process(settings)
    count = instances_per_process(settings, threads)
    shared = not on_gpu(settings)
    sets = [
        load_configured(settings, settings.models if names is None else names,
                        threads=max(1, threads // count))
        for _ in range(1 if shared else count)
    ]
    if settings.warmup:
        for models in sets:
            for model in models.values():
                warm_up(model, settings.batch_max_items, settings.batch_max_tokens)
    log.info("%d model(s) ready in %.1fs for %d inference thread(s) of %d thread(s) each, "
             "%s: %s", len(sets[0]), time.perf_counter() - started, count,
             max(1, threads // count), "sharing one session per model" if shared
             else "a session per model each", grew(before, rss_mb()))
    if shared:
        sets += [dict(sets[0]) for _ in range(count - 1)]
    return sets


def build_worker(settings: Settings, metrics: Metrics | None = None) -> Worker:
    """Load models, prepare Redis and topics, and join the group.

    The Kafka client library (consumer, dead letters, topic admin) is the one
    ``settings.kafka_client`` names (:mod:`embedstream.sources.registry`).
    """
    metrics = metrics or Metrics()
    # The configured models load before anything waits for the outside world, so a
    # configuration error (no such model, a provider that cannot start) exits 2 at once.
    configured = settings.models or sorted(find_models(settings.model_dir))
    instances = load_instances(settings, configured)
    waited = wait_until_answering(settings.redis)
    if waited >= 1:
        log.info("Redis answers after %.0fs", waited)
    # The model set: the configured one as the control document (announced models,
    # rollouts) amends it; the watcher follows its changes without a restart.
    control_client = connect(settings.redis)
    try:
        control = read_control(control_client, settings.key_prefix)
    except redis.RedisError as err:
        # Not fatal here: Redis answered a moment ago. Should it be away again, the
        # configured models serve and the sink's preparation waits for it; the watcher
        # applies the document once it can read it.
        log.warning("Redis: cannot read the model control document yet (%s): serving the "
                    "configured models until it can", err)
        control = Control()
    names = control.model_set(configured)
    if set(names) != set(configured):
        extra = [n for n in names if n not in configured]
        more = load_instances(settings, extra) if extra else [{} for _ in instances]
        instances = [{**{n: m for n, m in mine.items() if n in names}, **added}
                     for mine, added in zip(instances, more, strict=True)]
    models = instances[0]
    for model in models.values():
        m = model.manifest
        metrics.model_info.labels(m.name, m.modality, str(m.dimension), model.backend.provider).set(1)
    sink = RedisSink(settings.redis)
    # Redis or the broker away now (after the wait above): wait again rather than exit.
    retry(lambda: sink.prepare([m.manifest for m in models.values()]), **_WAIT)
    topics = sorted({settings.topic_for(m.manifest.modality) for m in models.values()})
    client = kafka_client(settings.kafka_client)
    retry(lambda: client.ensure_topics(settings.kafka, [*topics, settings.topic_dlq]), **_WAIT)
    dead_letters = client.dead_letters(settings.kafka)
    results = None
    if settings.publish_results:
        from embedstream.sinks.results import KafkaResultsPublisher

        results = KafkaResultsPublisher(settings.kafka, settings.key_prefix,
                                        tagged=sink.tagged)
    ledger = RedisCrashLedger(connect(settings.redis, retries=False), settings.key_prefix,
                              settings.group_id)
    routing = routing_for(settings, control, {n: m.modality for n, m in models.items()})
    worker = Worker(
        settings,
        models,
        source_factory=lambda listener: client.source(settings.kafka, topics, listener),
        sink=sink,
        dead_letters=dead_letters,
        metrics=metrics,
        results=results,
        replicas=instances[1:],
        ledger=ledger,
        routing=routing,
    )

    def load_one(name: str) -> list[LoadedModel]:
        return [instance[name] for instance in load_instances(settings, [name])]

    attach(settings, worker, instances, load_one, sink, control_client, metrics, configured,
           control)
    return worker


def run_worker(settings: Settings) -> int:
    """Run one worker process until SIGTERM/SIGINT; return its exit code."""
    metrics = Metrics()
    worker = build_worker(settings, metrics)
    server = None
    if settings.metrics_port:
        server = StatusServer(
            settings.metrics_host,
            settings.metrics_port,
            metrics.registry,
            alive=worker.liveness_checks,
            ready=worker.readiness,
        )

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if worker_stopping[0]:
            log.warning("second %s: exiting now; in-flight events will be redelivered",
                        signal.Signals(signum).name)
            os._exit(130)
        worker_stopping[0] = True
        log.info("%s: draining (up to %.0fs)", signal.Signals(signum).name,
                 settings.shutdown_timeout_s)
        worker.stop()

    worker_stopping = [False]
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics.ready.set_function(lambda: float(worker.ready()))
    log.info("worker consuming %s in group %s", worker.topics, settings.group_id)
    try:
        return worker.run()
    finally:
        if server is not None:
            server.close()


def _child_main(settings: Settings, index: int, log_level: str) -> None:
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s worker-{index} %(levelname)s %(name)s: %(message)s"
    )
    try:
        code = run_worker(settings)
    except EmbedstreamError as err:
        logging.getLogger(__name__).error("%s", err)
        code = 2
    raise SystemExit(code)


def run_pool(settings: Settings) -> int:
    """Run ``settings.processes`` workers in one group, restarting any that crash.

    A crashed process is restarted after a delay that doubles with each crash
    in a row (1 s, 2 s, 4 s ... up to ``restart_backoff_max_s``); one that ran
    for a minute or more starts the count afresh.
    """
    if settings.processes == 1:
        return run_worker(settings)
    ctx = multiprocessing.get_context("spawn")
    threads = threads_per_process(settings)

    def child_settings(index: int) -> Settings:
        port = settings.metrics_port + index if settings.metrics_port else 0
        return settings.model_copy(
            update={"processes": 1, "metrics_port": port, "intra_op_threads": threads}
        )

    def start(index: int) -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(
            target=_child_main, args=(child_settings(index), index, settings.log_level),
            name=f"embedstream-worker-{index}",
        )
        proc.start()
        started[index] = time.monotonic()
        return proc

    started: dict[int, float] = {}
    children = {i: start(i) for i in range(settings.processes)}
    restarts = RestartBackoff(settings.restart_backoff_max_s)
    due: dict[int, float] = {}  # crashed children waiting for their restart
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        due.clear()
        for proc in children.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("worker pool of %d processes, %d threads each", settings.processes, threads)
    worst = 0
    while children or due:
        for index, at in list(due.items()):
            if time.monotonic() >= at:
                del due[index]
                children[index] = start(index)
        for index, proc in list(children.items()):
            proc.join(timeout=0.2)
            if proc.is_alive():
                continue
            code = proc.exitcode or 0
            del children[index]
            if stopping:
                worst = max(worst, code)
            elif code == 2:  # configuration error: restarting cannot help
                log.error("worker %d failed to start; stopping the pool", index)
                on_signal(signal.SIGTERM, None)
                worst = 2
            else:
                delay = restarts.after_crash(index, time.monotonic() - started[index])
                log.warning("worker %d exited with %s; restarting in %.0fs", index, code, delay)
                due[index] = time.monotonic() + delay
        if not children and due:
            time.sleep(0.2)
    return worst


class RestartBackoff:
    """Delays before restarting a crashed pool process: 1 s doubling per crash in a row,
    capped; a process that lived ``healthy_s`` or more resets its count."""

    def __init__(self, max_s: float, healthy_s: float = 60.0) -> None:
        self._max_s = max_s
        self._healthy_s = healthy_s
        self._crashes: dict[int, int] = {}

    def after_crash(self, index: int, lived_s: float) -> float:
        crashes = 0 if lived_s >= self._healthy_s else self._crashes.get(index, 0)
        self._crashes[index] = crashes + 1
        return float(min(self._max_s, 2.0 ** crashes))
