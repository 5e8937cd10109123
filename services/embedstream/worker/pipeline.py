"""The worker: one consumer-group member and its stages, poll -> pre -> inference -> sink -> commit.

Threads and the stage each runs::

    polling thread (run)   the consumer: poll, the crash-loop breaker, and the
                           committer (offsets, backpressure, commits, rebalances)
      | polls                                   worker/committer.py, quarantine.py
    pre thread             decode, route, resolve payloads, preprocess, batch
      | batches (bounded)                       worker/pre.py
    inference thread(s)    one per model instance                worker/inference.py
      | results (bounded)
    sink thread            write, reject what the store refused, announce
      | done                                    worker/sink.py
    polling thread         commits the finished prefix of each partition

Errors are data. Each stage states in its docstring how every record leaves
it: onward, or to the dead-letter topic with a reason (any exception raised
while handling one record rejects that record alone; dead letters go through
:class:`~embedstream.worker.deadletters.DeadLetterer`). Only failures that are
not about a record stop or pause the worker: the broker or Redis unreachable
(waited out, not ready, nothing committed), a model that fails a known-good
input (the worker stops with exit code 1 and is restarted).

Only the polling thread touches the consumer (kafka-python's consumer is not
thread-safe), so completions travel back to it through the committer. A
stage thread that dies stops the worker with a non-zero exit; a stage that
holds work without progress for ``liveness_timeout_s`` fails liveness.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from embedstream.envelope import RawRecord
from embedstream.metrics import Metrics
from embedstream.models.routing import Routing
from embedstream.runtime.loader import LoadedModel
from embedstream.settings import Settings
from embedstream.sinks.base import Sink
from embedstream.sinks.results import ResultsPublisher
from embedstream.sources.base import DeadLetters, RebalanceListener, Source, TopicPartition
from embedstream.worker.committer import Committer
from embedstream.worker.deadletters import DeadLetterer
from embedstream.worker.fanout import Fanout
from embedstream.worker.inference import InferenceStage
from embedstream.worker.items import Position, position
from embedstream.worker.liveness import Liveness
from embedstream.worker.pre import PreStage
from embedstream.worker.quarantine import Breaker, CrashLedger
from embedstream.worker.sink import SinkStage

log = logging.getLogger(__name__)

_CAREFUL_POLL_S = 0.05
"""With a careful partition's record in hand, how long to wait for it to finish before
the consumer is polled again anyway."""


class Worker:
    """One consumer-group member and its stage threads.

    ``run`` blocks until :meth:`stop` is called (or a stage fails) and
    returns the process exit code: 0 after a clean drain, 1 on failure.
    """

    def __init__(
        self,
        settings: Settings,
        models: dict[str, LoadedModel],
        source_factory: Callable[[RebalanceListener], Source],
        sink: Sink,
        dead_letters: DeadLetters,
        metrics: Metrics,
        results: ResultsPublisher | None = None,
        replicas: list[dict[str, LoadedModel]] | None = None,
        ledger: CrashLedger | None = None,
        routing: Routing | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.metrics = metrics
        self.sink = sink
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._failure: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self.polling_ok = False
        self.liveness = Liveness(settings.liveness_timeout_s)
        self.max_in_flight = max(
            settings.max_poll_records * 2,
            settings.batch_sort_window + settings.max_poll_records * 2,
            settings.batch_max_items * settings.queue_depth * 3,
        )
        self.committer = Committer(settings, metrics, self.max_in_flight)
        # Every completion goes through the fan-out: a dual-written record is done
        # once each of its models finished it.
        self.fanout = Fanout(self.committer.done)
        self.dead_letters = DeadLetterer(dead_letters, metrics, self.fanout.done)
        self.on_start: list[Callable[[], None]] = []
        """Called as :meth:`run` starts (background helpers: the model watcher)."""
        self.on_stop: list[Callable[[], None]] = []
        """Called as the worker shuts down, before the stages drain."""
        reject = self.dead_letters.reject

        batches: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_depth)
        results_q: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_depth)
        self.pre = PreStage(settings, models, batches, reject, metrics,
                            self.liveness.heartbeat("pre"), self._abandon, results_q,
                            routing=routing, fanout=self.fanout)
        # One model set per inference thread: ``models`` first, then the replicas
        # (same models, sessions of their own).
        instances = [models, *(replicas or [])]
        self._inference_running = len(instances)
        self._inference_lock = threading.Lock()
        self.inference = [
            InferenceStage(instance, batches, results_q, reject, metrics,
                           self.liveness.heartbeat(_inference_name(i)), self._abandon,
                           self._inference_finished, settings.batch_max_items,
                           settings.batch_max_tokens)
            for i, instance in enumerate(instances)
        ]
        self.sink_stage = SinkStage(sink, results_q, reject, self.fanout.done, metrics,
                                    self.liveness.heartbeat("sink"), self._abandon, results)

        self.breaker = Breaker(ledger, settings.poison_max_deaths, self.max_in_flight, reject,
                               in_limbo=self.committer.in_limbo)
        # While any partition is careful, every polled record is kept back here and goes
        # into the pipeline alone (so a death is pinned on the one record in hand), taking
        # turns between partitions (a poison surfaces without waiting for the others).
        self._held: dict[TopicPartition, deque[RawRecord]] = {}
        self._isolated: Position | None = None
        # Records of partitions whose take-over the breaker could not record yet.
        self._waiting: list[RawRecord] = []
        self._last_poll = 0.0
        self._last_recheck = 0.0
        # Partitions that went elsewhere, with how many of their records were in flight.
        self._lost: queue.SimpleQueue[dict[TopicPartition, int]] = queue.SimpleQueue()
        self.committer.on_lost(self._lost.put)
        self.committer.on_lost(self.fanout.forget)
        self.committer.on_commit(self.breaker.committed)
        self.committer.on_revoked(self.breaker.revoking)
        self._poll_beat = self.liveness.heartbeat("poll")
        for name in self.liveness.names():
            beat = self.liveness.heartbeat(name)
            metrics.stage_stalled.labels(name).set_function(beat.stalled_for)
        metrics.careful.set_function(lambda: float(len(self.breaker.careful())))
        # Built last: the client calls the listener (the committer) from inside poll.
        self.source = source_factory(self.committer)
        self.committer.attach(self.source)

    @property
    def results(self) -> ResultsPublisher | None:
        """The "embedding ready" publisher: after the write, before done (None: off)."""
        return self.sink_stage.announcer

    @results.setter
    def results(self, publisher: ResultsPublisher | None) -> None:
        self.sink_stage.announcer = publisher

    @property
    def topics(self) -> list[str]:
        return sorted(self.pre.modality_of)

    # ------------------------------------------------------------------ control
    def apply_models(self, instances: list[dict[str, LoadedModel]], routing: Routing) -> None:
        """Serve another model set without a restart (any thread). ``instances`` holds one
        dict per inference thread (the same models, sessions of their own). The inference
        threads get theirs first, so a batch routed by the new routing finds its model."""
        for stage, models in zip(self.inference, instances, strict=True):
            stage.models = models
        self.models = instances[0]
        self.pre.apply(instances[0], routing)

    def stop(self) -> None:
        """Ask the worker to drain and exit (safe from signal handlers and threads)."""
        self._stopping.set()

    def liveness_checks(self) -> dict[str, Any]:
        """Liveness: every stage thread runs and none is stuck with work (seconds stalled)."""
        return {
            "stages_running": self._failure is None and all(t.is_alive() for t in self._threads),
            "stalled": self.liveness.stalled(),
        }

    def healthy(self) -> bool:
        checks = self.liveness_checks()
        return bool(checks["stages_running"]) and not checks["stalled"]

    def readiness(self) -> dict[str, bool]:
        """Each readiness check: all must hold for the worker to be ready."""
        return {
            "models_loaded": bool(self.models),
            "stages": self.healthy(),
            "consumer": self.polling_ok and self.source.connected(),
            "redis": self.sink_stage.store_ok and self.sink.ping(),
            "redis_memory": not self.sink_stage.store_full,
            "dead_letters": self.dead_letters.ok,
        }

    def ready(self) -> bool:
        return all(self.readiness().values())

    # ------------------------------------------------------------ polling thread
    def run(self) -> int:
        self._start_stages()
        for hook in self.on_start:
            hook()
        try:
            while not self._stopping.is_set() and self._failure is None:
                self._poll_once()
        except Exception as err:  # the consumer itself failed: about the world
            log.exception("polling failed")
            self._failure = err
        return self._shutdown()

    def _poll_once(self) -> None:
        self._poll_beat.busy()  # the polling thread always has work: polling
        self.committer.settle()
        self._forget_lost()
        if self._isolated is not None and time.monotonic() - self._last_poll < _CAREFUL_POLL_S:
            # Careful mode: the next record goes in as soon as the one in hand is done.
            self.committer.wait_progress(_CAREFUL_POLL_S)
            self.committer.settle()
            self._release()
            return
        self.committer.apply_backpressure(
            held=len(self._waiting) + sum(len(q) for q in self._held.values()))
        records = self.source.poll(timeout_s=0.1)
        self._last_poll = time.monotonic()
        self.polling_ok = True
        self._forget_lost()
        if records:
            self.committer.track(records)
        if records or self._waiting:
            admitted, self._waiting = self.breaker.admit([*self._waiting, *records])
            if self.breaker.careful() or self._held:
                for r in admitted:
                    self._held.setdefault((r.topic, r.partition), deque()).append(r)
            elif admitted:
                self.pre.submit(admitted)
        self._release()

    def _release(self) -> None:
        """While careful: hand held records to the pre stage one at a time, in turns."""
        if self._isolated is not None:
            if self.committer.pending(self._isolated):
                return  # the record in hand is not finished yet
            self._isolated = None
            self.breaker.isolated_done()
        if self.breaker.careful():
            self._recheck_careful()
        if not self.breaker.careful():
            for tp in list(self._held):  # careful mode ended: the rest goes in batches
                self.pre.submit(list(self._held.pop(tp)))
            return
        # Not a partition in limbo (revoked, the new assignment not known yet): its next
        # owner may already read its mark, and would take the record named there for
        # the one that killed this process.
        waiting = [tp for tp in self._held if self._held[tp] and not self.committer.in_limbo(tp)]
        if not waiting:
            return
        kept_back = len(self._waiting) + sum(len(held) for held in self._held.values())
        if self.committer.in_flight() > kept_back:
            # Records that went in before careful mode began are still in the pipeline:
            # should one of them kill the process now, the death would be pinned on the
            # record put in "alone". It goes in once they are done.
            return
        tp = waiting[0]
        record = self._held[tp][0]
        if not self.breaker.isolate(record):
            return  # its mark could not be written: it waits (the store is away)
        self._held[tp].popleft()
        self._held[tp] = self._held.pop(tp)  # its turn is over: to the back of the line
        self._isolated = position(record)
        self.pre.submit([record], alone=True)

    def _recheck_careful(self) -> None:
        """Every half second while careful: deaths explained since, partitions caught up."""
        now = time.monotonic()
        if now - self._last_recheck < _CAREFUL_POLL_S * 10:
            return
        self._last_recheck = now
        self.breaker.recheck()
        waiting = {tp for tp, held in self._held.items() if held}
        careful = self.breaker.careful() - waiting
        if not careful:
            return
        lags = self.source.lag()
        for tp in careful:
            if lags.get(tp, 1) == 0:
                self.breaker.caught_up(tp)

    def _forget_lost(self) -> None:
        """Partitions that went to another member in the last poll: drop what was held
        back for them (the new owner consumes them from their committed offsets)."""
        while True:
            try:
                lost = self._lost.get_nowait()
            except queue.Empty:
                return
            for tp in lost:
                self._held.pop(tp, None)
            self._waiting = [r for r in self._waiting if (r.topic, r.partition) not in lost]
            dropped = self.pre.drop(set(lost))
            if dropped:
                log.info("dropped %d queued records of partitions now owned elsewhere",
                         sum(dropped.values()))
            # Records past the queue are still being processed here: should one of them
            # kill this process, the next owner must count that death.
            busy = {tp for tp, n in lost.items() if n > dropped.get(tp, 0)}
            self.breaker.leave(set(lost), busy)

    def _shutdown(self) -> int:
        """Drain within ``shutdown_timeout_s``, commit what is stored, leave the group."""
        in_flight = -1
        for hook in self.on_stop:
            try:
                hook()
            except Exception:
                log.exception("stopping a helper failed")
        try:
            deadline = time.monotonic() + self.settings.shutdown_timeout_s
            self.pre.finish()
            for thread in self._threads:
                while thread.is_alive() and time.monotonic() < deadline:
                    self.committer.settle()
                    thread.join(timeout=0.05)
            if any(t.is_alive() for t in self._threads):
                log.warning("shutdown timeout: abandoning in-flight batches (they stay uncommitted)")
                self._abandon.set()
            self.dead_letters.flush(timeout_s=max(1.0, deadline - time.monotonic()))
            self.committer.settle(force=True)
            in_flight = self.committer.in_flight()
            self.breaker.leave(self.breaker.owned())  # a clean exit: no death to report
        finally:
            self._abandon.set()
            closers: list[Callable[[], None]] = [self.source.close, self.dead_letters.close,
                                                 self.sink.close]
            if self.results is not None:
                closers.append(self.results.close)
            for close in closers:
                try:
                    close()
                except Exception:
                    log.exception("closing %s failed", getattr(close, "__qualname__", close))
        log.info("worker stopped; %d events left uncommitted for redelivery", in_flight)
        return 1 if self._failure is not None else 0

    # ------------------------------------------------------------------- stages
    def _start_stages(self) -> None:
        stages: list[tuple[str, Callable[[], None]]] = [("pre", self.pre.run)]
        stages += [(_inference_name(i), stage.run) for i, stage in enumerate(self.inference)]
        stages.append(("sink", self.sink_stage.run))
        for name, target in stages:
            thread = threading.Thread(
                target=self._supervised, args=(name, target), name=f"embedstream-{name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def _supervised(self, name: str, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as err:
            log.exception("stage %s died; stopping the worker", name)
            self._failure = err
            self._stopping.set()
            self._abandon.set()

    def _inference_finished(self) -> bool:
        """An inference thread saw the stop marker; True for the last one."""
        with self._inference_lock:
            self._inference_running -= 1
            return self._inference_running == 0


def _inference_name(index: int) -> str:
    return "inference" if index == 0 else f"inference-{index}"
