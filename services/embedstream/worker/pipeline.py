"""The worker pipeline: poll -> pre -> inference -> sink -> commit.

Threads and what they own::

    polling thread (run)    the consumer: poll, offset tracking, commits,
                            pause/resume for backpressure, rebalances
      | records queue
    pre thread              decode envelopes, tokenize, pack budgeted batches;
                            bad events go to the dead-letter topic
      | batches queue (bounded)
    inference thread        backend.embed(batch); a failing batch is retried
                            item by item so one bad item never fails the rest
      | results queue (bounded)
    sink thread             one pipelined Redis write per batch, retried with
                            bounded backoff while Redis is away
      | done queue
    polling thread          marks offsets done, commits the contiguous prefix

Only the polling thread touches the consumer (kafka-python's consumer is not
thread-safe), so completions travel back to it on the done queue. A stage
thread that dies stops the whole worker with a non-zero exit: nothing hangs
waiting for a dead thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedstream.batching import Batch, BatchBudget, Batcher
from embedstream.envelope import Event, RawRecord, decode
from embedstream.errors import EnvelopeError, ModelError, SinkError
from embedstream.metrics import Metrics
from embedstream.runtime.loader import LoadedModel
from embedstream.runtime.text import Tokenized
from embedstream.settings import Settings
from embedstream.sinks.base import Embedded, Sink, WriteOutcome
from embedstream.sources.base import DeadLetters, Source, TopicPartition
from embedstream.worker.offsets import OffsetTracker

log = logging.getLogger(__name__)

_STOP = object()  # end-of-stream marker passed down the stage queues
_LAG_INTERVAL_S = 5.0
_SINK_BACKOFF_MAX_S = 5.0


@dataclass(slots=True)
class Item:
    """An event with its model input, waiting for or inside a batch."""

    event: Event
    tokens: Tokenized


@dataclass(slots=True)
class WorkBatch:
    model: LoadedModel
    items: list[Item]
    padded_tokens: int


@dataclass(slots=True)
class ResultBatch:
    model: LoadedModel
    items: list[Item]
    vectors: np.ndarray


class Worker:
    """One consumer-group member and its stage threads.

    ``run`` blocks until :meth:`stop` is called (or a stage fails) and
    returns the process exit code: 0 after a clean drain, 1 on failure.
    """

    def __init__(
        self,
        settings: Settings,
        models: dict[str, LoadedModel],
        source_factory: Callable[[Callable[[set[TopicPartition]], None]], Source],
        sink: Sink,
        dead_letters: DeadLetters,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.models = models
        self.sink = sink
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.modality_of = {settings.topic_for(m): m for m in _modalities(models)}
        self.default_model = _default_models(settings, models)
        self.budget = BatchBudget(
            settings.batch_max_items, settings.batch_max_tokens, settings.batch_max_wait_ms / 1000,
            settings.batch_max_padding,
        )
        self._max_in_flight = max(
            settings.max_poll_records * 2, settings.batch_max_items * settings.queue_depth * 3
        )

        self._records: queue.Queue[Any] = queue.Queue()
        self._batches: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_depth)
        self._results: queue.Queue[Any] = queue.Queue(maxsize=settings.queue_depth)
        # Completed (topic, partition, offset) lists, for the polling thread.
        self._done: queue.SimpleQueue[list[tuple[str, int, int]]] = queue.SimpleQueue()
        self._tracker = OffsetTracker()
        # Payload bytes per in-flight (topic, partition, offset): the memory budget.
        self._in_flight_bytes = 0
        self._sizes: dict[tuple[str, int, int], int] = {}
        self._stopping = threading.Event()
        self._abandon = threading.Event()
        self._failure: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self.sink_ok = True
        self.dlq_ok = True
        self.polling_ok = False
        # Built last: kafka-python may call on_revoked from inside poll only.
        self.source = source_factory(self._on_revoked)

    @property
    def topics(self) -> list[str]:
        return sorted(self.modality_of)

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Ask the worker to drain and exit (safe from signal handlers and threads)."""
        self._stopping.set()

    def healthy(self) -> bool:
        """Liveness: no stage has died."""
        return self._failure is None and all(t.is_alive() for t in self._threads)

    def readiness(self) -> dict[str, bool]:
        """Each readiness check: all must hold for the worker to be ready."""
        return {
            "models_loaded": bool(self.models),
            "stages": self.healthy(),
            "consumer": self.polling_ok and self.source.connected(),
            "redis": self.sink_ok and self.sink.ping(),
            "dead_letters": self.dlq_ok,
        }

    def ready(self) -> bool:
        return all(self.readiness().values())

    # ------------------------------------------------------------ polling thread
    def run(self) -> int:
        self._start_stages()
        last_lag = 0.0
        try:
            while not self._stopping.is_set() and self._failure is None:
                self._settle()
                self._apply_backpressure()
                records = self.source.poll(timeout_s=0.1)
                self.polling_ok = True
                if records:
                    for r in records:
                        self._tracker.add((r.topic, r.partition), r.offset)
                        size = len(r.value or b"")
                        self._sizes[(r.topic, r.partition, r.offset)] = size
                        self._in_flight_bytes += size
                    self.metrics.in_flight.set(self._tracker.in_flight())
                    self._records.put(records)
                if time.monotonic() - last_lag > _LAG_INTERVAL_S:
                    self._update_lag()
                    last_lag = time.monotonic()
        except Exception as err:  # the polling thread itself failed
            log.exception("polling failed")
            self._failure = err
        return self._shutdown()

    def _settle(self) -> None:
        """Apply completions and commit the contiguous prefix per partition."""
        self._apply_done()
        self._commit(self._tracker.committable())
        self.metrics.in_flight.set(self._tracker.in_flight())

    def _apply_done(self) -> None:
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                break
            for topic, partition, offset in done:
                self._tracker.done((topic, partition), offset)
                self._in_flight_bytes -= self._sizes.pop((topic, partition, offset), 0)

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        started = time.perf_counter()
        if self.source.commit(offsets):
            self._tracker.committed(offsets)
            self.metrics.commits.inc()
        self.metrics.stage_seconds.labels("commit").observe(time.perf_counter() - started)

    def _apply_backpressure(self) -> None:
        if (
            self._tracker.in_flight() >= self._max_in_flight
            or self._in_flight_bytes >= self.settings.max_in_flight_bytes
        ):
            self.source.pause()
        else:
            self.source.resume()

    def _update_lag(self) -> None:
        lags = self.source.lag()
        for (topic, partition), lag in lags.items():
            self.metrics.consumer_lag.labels(topic, str(partition)).set(lag)

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before partitions move: commit what is finished, forget the rest.

        Runs on the Kafka client's I/O thread while the polling thread waits
        inside ``poll``, so it must not block: it applies the completions so
        far and sends their commit without waiting. Events still in flight
        are redelivered to the new owner; those already stored by then are
        recognised there as duplicates (same version).
        """
        self._apply_done()
        self.source.commit_nowait(self._tracker.committable(revoked))
        self._tracker.forget(revoked)
        for position in [p for p in self._sizes if (p[0], p[1]) in revoked]:
            self._in_flight_bytes -= self._sizes.pop(position)
        for topic, partition in revoked:
            self.metrics.consumer_lag.labels(topic, str(partition)).set(0)

    def _shutdown(self) -> int:
        """Drain within ``shutdown_timeout_s``, commit what is stored, leave the group."""
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        self._records.put(_STOP)
        for thread in self._threads:
            while thread.is_alive() and time.monotonic() < deadline:
                self._settle()
                thread.join(timeout=0.05)
        if any(t.is_alive() for t in self._threads):
            log.warning("shutdown timeout: abandoning in-flight batches (they stay uncommitted)")
            self._abandon.set()
        self.dead_letters.flush(timeout_s=max(1.0, deadline - time.monotonic()))
        self._settle()
        in_flight = self._tracker.in_flight()
        self.source.close()
        self.dead_letters.close()
        self.sink.close()
        log.info("worker stopped; %d events left uncommitted for redelivery", in_flight)
        return 1 if self._failure is not None else 0

    # ------------------------------------------------------------------- stages
    def _start_stages(self) -> None:
        for name, target in (
            ("pre", self._pre_stage),
            ("inference", self._inference_stage),
            ("sink", self._sink_stage),
        ):
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

    def _put(self, q: queue.Queue[Any], item: Any) -> bool:
        """Blocking put that gives up when the worker abandons its work."""
        while not self._abandon.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _pre_stage(self) -> None:
        batchers: dict[str, Batcher[Item]] = {
            name: Batcher(self.budget) for name in self.models
        }
        while not self._abandon.is_set():
            deadlines = [d for b in batchers.values() if (d := b.deadline()) is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.2
            try:
                records = self._records.get(timeout=timeout)
            except queue.Empty:
                records = None
            if records is _STOP:
                for name, batcher in batchers.items():
                    self._emit(name, batcher.flush())
                self._put(self._batches, _STOP)
                return
            if records:
                for name, items in self._prepare(records).items():
                    self._emit(name, batchers[name].add_many(items))
            for name, batcher in batchers.items():
                self._emit(name, batcher.due())

    def _prepare(self, records: list[RawRecord]) -> dict[str, list[tuple[Item, int]]]:
        """Decode and tokenize one poll's records, grouped by model."""
        started = time.perf_counter()
        by_model: dict[str, list[Event]] = {}
        for record in records:
            self.metrics.consumed.labels(record.topic).inc()
            try:
                event = decode(
                    record, self.modality_of[record.topic], self.settings.max_payload_bytes
                )
                if event.text is not None and len(event.text) > self.settings.max_text_chars:
                    raise EnvelopeError(
                        "text_too_long",
                        f"text has {len(event.text)} characters, limit "
                        f"{self.settings.max_text_chars}",
                    )
                name = event.model or self.default_model.get(event.modality)
                if name is None or name not in self.models:
                    raise EnvelopeError(
                        "unknown_model",
                        f"model {name!r} is not served here; served: {sorted(self.models)}",
                    )
            except EnvelopeError as err:
                self._dead_letter(record, err.reason, err.detail)
                continue
            by_model.setdefault(name, []).append(event)
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - started)

        started = time.perf_counter()
        out: dict[str, list[tuple[Item, int]]] = {}
        for name, events in by_model.items():
            model = self.models[name]
            assert model.text is not None  # only text models in this pipeline so far
            tokens = model.text.tokenize([e.text or "" for e in events])
            items: list[tuple[Item, int]] = []
            for event, tok in zip(events, tokens, strict=True):
                if tok.truncated and self.settings.text_overflow == "reject":
                    self._dead_letter(
                        event.record, "text_too_long",
                        f"text is over the {model.text.max_length}-token limit of {name}",
                    )
                    continue
                if tok.truncated:
                    self.metrics.truncated.labels(name).inc()
                items.append((Item(event, tok), tok.length))
            out[name] = items
        self.metrics.stage_seconds.labels("tokenize").observe(time.perf_counter() - started)
        return out

    def _emit(self, name: str, batches: list[Batch[Item]]) -> None:
        for batch in batches:
            self._put(self._batches, WorkBatch(self.models[name], batch.items, batch.padded_tokens))

    def _inference_stage(self) -> None:
        while not self._abandon.is_set():
            try:
                work = self._batches.get(timeout=0.1)
            except queue.Empty:
                continue
            if work is _STOP:
                self._put(self._results, _STOP)
                return
            started = time.perf_counter()
            items, vectors = self._embed(work)
            self.metrics.stage_seconds.labels("inference").observe(time.perf_counter() - started)
            self.metrics.batch_size.labels(work.model.name).observe(len(work.items))
            self.metrics.batch_tokens.labels(work.model.name).observe(work.padded_tokens)
            if items:
                self._put(self._results, ResultBatch(work.model, items, vectors))

    def _embed(self, work: WorkBatch) -> tuple[list[Item], np.ndarray]:
        """Embed a batch; on failure retry one by one and dead-letter the failures."""
        model = work.model
        try:
            return work.items, model.embed_tokenized([i.tokens for i in work.items])
        except ModelError as err:
            log.warning("batch of %d failed (%s); retrying items one by one", len(work.items), err)
        good: list[Item] = []
        vectors: list[np.ndarray] = []
        for item in work.items:
            try:
                vectors.append(model.embed_tokenized([item.tokens])[0])
                good.append(item)
            except ModelError as err:
                self._dead_letter(item.event.record, "model_error", str(err))
        dim = model.manifest.dimension
        return good, (np.stack(vectors) if vectors else np.zeros((0, dim), np.float32))

    def _sink_stage(self) -> None:
        while not self._abandon.is_set():
            try:
                result = self._results.get(timeout=0.1)
            except queue.Empty:
                continue
            if result is _STOP:
                return
            embedded = [
                Embedded(item.event, result.model.manifest, vector)
                for item, vector in zip(result.items, result.vectors, strict=True)
            ]
            outcome = self._write(embedded)
            if outcome is None:
                return  # abandoned while Redis was away: nothing of it is committed
            now_ms = time.time() * 1000
            name = result.model.name
            self.metrics.embedded.labels(name).inc(outcome.stored)
            if outcome.duplicates:
                self.metrics.duplicates.labels(name).inc(outcome.duplicates)
            if outcome.stale:
                self.metrics.stale.labels(name).inc(outcome.stale)
            e2e = self.metrics.end_to_end_seconds.labels(name)
            for item in result.items:
                e2e.observe(max(0.0, now_ms - item.event.record.timestamp_ms) / 1000)
            self._done.put(
                [(i.event.record.topic, i.event.record.partition, i.event.record.offset)
                 for i in result.items]
            )

    def _write(self, embedded: list[Embedded]) -> WriteOutcome | None:
        """Write with bounded exponential backoff until it succeeds (None: abandoned)."""
        delay = 0.1
        while not self._abandon.is_set():
            started = time.perf_counter()
            try:
                outcome = self.sink.write(embedded)
            except SinkError as err:
                self.sink_ok = False
                self.metrics.sink_retries.inc()
                log.warning("store unavailable, retrying in %.1fs: %s", delay, err)
                self._abandon.wait(delay)
                delay = min(delay * 2, _SINK_BACKOFF_MAX_S)
                continue
            self.sink_ok = True
            self.metrics.stage_seconds.labels("sink").observe(time.perf_counter() - started)
            return outcome
        return None

    def _dead_letter(self, record: RawRecord, reason: str, detail: str) -> None:
        position = (record.topic, record.partition, record.offset)

        def on_done() -> None:
            self.dlq_ok = True
            self.metrics.failed.labels(reason).inc()
            self._done.put([position])

        def on_error(err: Exception) -> None:
            # The event stays uncommitted (in flight) until its dead letter is
            # written: retry with bounded backoff, the broker may be back soon.
            self.dlq_ok = False
            delay = min(_SINK_BACKOFF_MAX_S, 0.5 * 2 ** min(attempt[0], 4))
            attempt[0] += 1
            log.warning("dead letter for %s not written (%s); retrying in %.1fs",
                        position, err, delay)
            if not self._abandon.wait(delay):
                send()

        def send() -> None:
            self.dead_letters.send(record, reason, detail, on_done, on_error)

        attempt = [0]
        log.info("rejecting %s:%d@%d: %s (%s)", *position, reason, detail)
        send()


def _modalities(models: dict[str, LoadedModel]) -> set[str]:
    return {m.manifest.modality for m in models.values()}


def _default_models(settings: Settings, models: dict[str, LoadedModel]) -> dict[str, str]:
    """The model used for events that name none, per modality."""
    defaults: dict[str, str] = {}
    for modality in _modalities(models):
        served = sorted(n for n, m in models.items() if m.manifest.modality == modality)
        preferred = settings.default_text_model if modality == "text" else None
        defaults[modality] = preferred if preferred in served else served[0]
    return defaults
