"""The worker pipeline: poll -> pre -> inference -> sink -> commit.

Threads and what they own::

    polling thread (run)    the consumer: poll, offset tracking, commits,
                            pause/resume for backpressure, rebalances
      | records queue
    pre thread              decode envelopes, resolve binary payloads (inline,
                            raw bytes, uri), preprocess (tokenize, decode
                            images/audio), pack budgeted batches; bad events
                            go to the dead-letter topic with their reason
      | batches queue (bounded)
    inference thread(s)     backend.embed(batch); a failing batch is retried
                            item by item so one bad item never fails the rest;
                            with inference_instances > 1, one thread per model
                            instance, taking batches from the same queue
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

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedstream.batching import Batch, BatchBudget, Batcher
from embedstream.envelope import HEADER_CONTENT_TYPE, Event, RawRecord, decode, header
from embedstream.errors import EnvelopeError, ModelError, SinkError
from embedstream.metrics import Metrics
from embedstream.payloads import PayloadResolver
from embedstream.runtime.loader import LoadedModel
from embedstream.runtime.preprocess import Prepared
from embedstream.settings import Settings
from embedstream.sinks.base import Embedded, Sink, WriteOutcome
from embedstream.sinks.results import ResultsPublisher
from embedstream.sources.base import DeadLetters, Source, TopicPartition
from embedstream.worker.offsets import OffsetTracker

log = logging.getLogger(__name__)

_AUDIO_WINDOW_BATCHES = 4
_STOP = object()  # end-of-stream marker passed down the stage queues
_LAG_INTERVAL_S = 5.0
_SINK_BACKOFF_MAX_S = 5.0


@dataclass(slots=True)
class Item:
    """An event with its model input, waiting for or inside a batch."""

    event: Event
    prepared: Prepared


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
    tokens: list[np.ndarray] | None = None


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
        results: ResultsPublisher | None = None,
        replicas: list[dict[str, LoadedModel]] | None = None,
    ) -> None:
        self.settings = settings
        self.results = results  # "embedding ready" records, after the write, before done
        self.models = models
        # One model set per inference thread: ``models`` first, then the replicas
        # (same models, sessions of their own).
        self._instances = [models, *(replicas or [])]
        self._inference_running = len(self._instances)
        self._inference_lock = threading.Lock()
        self.sink = sink
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.modality_of = {settings.topic_for(m): m for m in _modalities(models)}
        self.default_model = _default_models(settings, models)
        self.payloads = PayloadResolver(settings)
        # A JSON envelope may hold base64 data: 4/3 of the inline limit, plus the envelope.
        self._max_record = {
            "text": settings.max_payload_bytes,
            "binary_json": settings.payload_max_inline_bytes * 4 // 3 + (64 << 10),
            "binary_raw": settings.payload_max_inline_bytes,
        }
        self.budget = BatchBudget(
            settings.batch_max_items, settings.batch_max_tokens, settings.batch_max_wait_ms / 1000,
            settings.batch_max_padding,
        )
        # Records sorted by length together under a backlog, per modality. Audio's
        # window is a few batches: a clip takes ~10 ms to decode here, so a window
        # of 2,048 would keep the first batch waiting for seconds.
        self._sort_windows = {
            "text": settings.batch_sort_window,
            "audio": min(settings.batch_sort_window, _AUDIO_WINDOW_BATCHES * settings.batch_max_items),
        }
        self._max_in_flight = max(
            settings.max_poll_records * 2,
            settings.batch_sort_window + settings.max_poll_records * 2,
            settings.batch_max_items * settings.queue_depth * 3,
        )

        self._records: queue.Queue[Any] = queue.Queue()
        self._held: list[Any] = []  # a poll taken from _records but handled next (pre stage)
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

        Runs inside ``poll``: on kafka-python's I/O thread while the polling
        thread waits (confluent-kafka runs it on the polling thread itself),
        so it must not block: it applies the completions so far and sends
        their commit without waiting. Events still in flight
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
        if self.results is not None:
            self.results.close()
        log.info("worker stopped; %d events left uncommitted for redelivery", in_flight)
        return 1 if self._failure is not None else 0

    # ------------------------------------------------------------------- stages
    def _start_stages(self) -> None:
        stages: list[tuple[str, Callable[[], None]]] = [("pre", self._pre_stage)]
        for index in range(len(self._instances)):
            name = "inference" if index == 0 else f"inference-{index}"
            stages.append((name, functools.partial(self._inference_stage, index)))
        stages.append(("sink", self._sink_stage))
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
            records = self._next_records(timeout)
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

    def _next_records(self, timeout: float) -> Any:
        """The next poll (merged with the text backlog), the stop marker, or None."""
        if self._held:
            records = self._held.pop()
        else:
            try:
                records = self._records.get(timeout=timeout)
            except queue.Empty:
                return None
        return records if records is _STOP else self._drain_backlog(records)

    def _drain_backlog(self, records: list[RawRecord]) -> list[RawRecord]:
        """Merge polls of the same kind queued behind ``records``, up to its sort window.

        Under a backlog the polls queue up while inference is busy; sorting them
        together packs batches of similar length (less padding) and fills them
        (a poll of large audio files holds a few clips only). Text and audio
        polls merge with their own kind; image polls never do, their inputs have
        one size. A full poll (``max_poll_records``) is the sign of a backlog:
        the next poll is then awaited for up to ``batch_max_wait_ms`` (the
        consumer usually has it fetched already), so the first window after a
        start or a pause is full too, not one poll. Under light load polls are
        not full and this returns what is queued at once. A queued poll of
        another kind, or the stop marker, ends the merge and is handled next
        (it goes back to the head of the pre stage's input).
        """
        kind = self._kind(records)
        window = self._sort_windows.get(kind, 0) if kind is not None else 0
        merged = list(records)
        deadline = time.monotonic() + self.settings.batch_max_wait_ms / 1000
        backlog = len(records) >= self.settings.max_poll_records
        while len(merged) < window:
            try:
                if backlog:
                    more = self._records.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    more = self._records.get_nowait()
            except queue.Empty:
                break
            if more is _STOP or self._kind(more) != kind:
                self._held.append(more)
                break
            merged.extend(more)
            backlog = len(more) >= self.settings.max_poll_records
        return merged

    def _kind(self, records: list[RawRecord]) -> str | None:
        """The modality of every record of a poll, or None for a mixed poll."""
        kinds = {self.modality_of.get(r.topic) for r in records}
        return kinds.pop() if len(kinds) == 1 else None

    def _prepare(self, records: list[RawRecord]) -> dict[str, list[tuple[Item, int]]]:
        """Decode and preprocess one poll's records, grouped by model."""
        started = time.perf_counter()
        by_model: dict[str, list[Event]] = {}
        for record in records:
            self.metrics.consumed.labels(record.topic).inc()
            try:
                event = self._decode(record)
                name = self._model_of(event)
            except EnvelopeError as err:
                self._dead_letter(record, err.reason, err.detail)
                continue
            by_model.setdefault(name, []).append(event)
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - started)

        out: dict[str, list[tuple[Item, int]]] = {}
        for name, events in by_model.items():
            started = time.perf_counter()
            model = self.models[name]
            events, inputs = self._inputs(events)
            items: list[tuple[Item, int]] = []
            for event, result in zip(events, model.preprocessor.prepare(inputs), strict=True):
                if isinstance(result, EnvelopeError):
                    self._dead_letter(event.record, result.reason, result.detail)
                elif result.truncated and self.settings.text_overflow == "reject":
                    self._dead_letter(event.record, "text_too_long",
                                      f"text is over the token limit of {name}")
                else:
                    items.append((Item(event, result), result.cost))
            truncated = sum(item.prepared.truncated for item, _ in items)
            if truncated:
                self.metrics.truncated.labels(name).inc(truncated)
            out[name] = items
            stage = "tokenize" if model.modality == "text" else "preprocess"
            self.metrics.stage_seconds.labels(stage).observe(time.perf_counter() - started)
        return out

    def _decode(self, record: RawRecord) -> Event:
        modality = self.modality_of[record.topic]
        if modality == "text":
            event = decode(record, modality, self._max_record["text"])
            if event.text is not None and len(event.text) > self.settings.max_text_chars:
                raise EnvelopeError(
                    "text_too_long",
                    f"text has {len(event.text)} characters, limit {self.settings.max_text_chars}",
                )
            return event
        form = "binary_json" if header(record, HEADER_CONTENT_TYPE) is None else "binary_raw"
        return decode(record, modality, self._max_record[form])

    def _model_of(self, event: Event) -> str:
        """The model that embeds ``event``: the one it names, else its modality's default."""
        name = event.model or self.default_model.get(event.modality)
        model = self.models.get(name) if name is not None else None
        if model is None or model.modality != event.modality:
            raise EnvelopeError(
                "unknown_model",
                f"no {event.modality} model {name!r} is served here; served: "
                f"{sorted(n for n, m in self.models.items() if m.modality == event.modality)}",
            )
        return model.name

    def _inputs(self, events: list[Event]) -> tuple[list[Event], list[Any]]:
        """The events whose input could be had, and those inputs (texts or file bytes)."""
        kept: list[Event] = []
        inputs: list[Any] = []
        for event in events:
            if event.modality == "text":
                kept.append(event)
                inputs.append(event.text or "")
                continue
            try:
                inputs.append(self.payloads.resolve(event))
            except EnvelopeError as err:
                self._dead_letter(event.record, err.reason, err.detail)
                continue
            kept.append(event)
        return kept, inputs

    def _emit(self, name: str, batches: list[Batch[Item]]) -> None:
        for batch in batches:
            self._put(self._batches, WorkBatch(self.models[name], batch.items, batch.padded_tokens))

    def _inference_stage(self, instance: int = 0) -> None:
        """One inference thread, running its own instance of each model."""
        models = self._instances[instance]
        while not self._abandon.is_set():
            try:
                work = self._batches.get(timeout=0.1)
            except queue.Empty:
                continue
            if work is _STOP:
                self._put(self._batches, _STOP)  # for the other inference threads
                with self._inference_lock:
                    self._inference_running -= 1
                    last = self._inference_running == 0
                if last:  # the sink stops after every inference thread has
                    self._put(self._results, _STOP)
                return
            started = time.perf_counter()
            result = self._embed(work, models[work.model.name])
            self.metrics.stage_seconds.labels("inference").observe(time.perf_counter() - started)
            self.metrics.batch_size.labels(work.model.name).observe(len(work.items))
            self.metrics.batch_tokens.labels(work.model.name).observe(work.padded_tokens)
            if result.items:
                self._put(self._results, result)

    def _run_model(
        self, model: LoadedModel, items: list[Item]
    ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        prepared = [i.prepared for i in items]
        if model.token_mode:
            return model.embed_prepared_tokens(prepared)
        return model.embed_prepared(prepared), None

    def _embed(self, work: WorkBatch, model: LoadedModel) -> ResultBatch:
        """Embed a batch with ``model`` (this thread's instance of ``work.model``); on
        failure retry one by one and dead-letter the failures."""
        try:
            return ResultBatch(model, work.items, *self._run_model(model, work.items))
        except ModelError as err:
            log.warning("batch of %d failed (%s); retrying items one by one", len(work.items), err)
        good: list[Item] = []
        vectors: list[np.ndarray] = []
        tokens: list[np.ndarray] = []
        for item in work.items:
            try:
                pooled, item_tokens = self._run_model(model, [item])
            except ModelError as err:
                self._dead_letter(item.event.record, "model_error", str(err))
                continue
            vectors.append(pooled[0])
            tokens.extend(item_tokens or [])
            good.append(item)
        dim = model.manifest.dimension
        stacked = np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)
        return ResultBatch(model, good, stacked, tokens if model.token_mode else None)

    def _sink_stage(self) -> None:
        while not self._abandon.is_set():
            try:
                result = self._results.get(timeout=0.1)
            except queue.Empty:
                continue
            if result is _STOP:
                return
            tokens: list[np.ndarray | None] = (
                list(result.tokens) if result.tokens is not None else [None] * len(result.items)
            )
            embedded = [
                Embedded(item.event, result.model.manifest, vector, item_tokens)
                for item, vector, item_tokens in zip(
                    result.items, result.vectors, tokens, strict=True
                )
            ]
            outcome = self._write(embedded)
            if outcome is None:
                return  # abandoned while Redis was away: nothing of it is committed
            if self.results is not None and not self._announce(embedded):
                return  # stored but unannounced: uncommitted, so redelivered and announced
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

    def _announce(self, embedded: list[Embedded]) -> bool:
        """Publish the stored batch to the results stream, retried like the write."""
        assert self.results is not None
        delay = 0.1
        while not self._abandon.is_set():
            try:
                self.results.publish(embedded)
                return True
            except SinkError as err:
                log.warning("results stream unavailable, retrying in %.1fs: %s", delay, err)
                self._abandon.wait(delay)
                delay = min(delay * 2, _SINK_BACKOFF_MAX_S)
        return False

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
    return {m.modality for m in models.values()}


def _default_models(settings: Settings, models: dict[str, LoadedModel]) -> dict[str, str]:
    """The model used for events that name none, per modality."""
    defaults: dict[str, str] = {}
    for modality in _modalities(models):
        served = sorted(n for n, m in models.items() if m.manifest.modality == modality)
        preferred = {
            "text": settings.default_text_model,
            "image": settings.default_image_model,
            "audio": settings.default_audio_model,
        }.get(modality)
        defaults[modality] = preferred if preferred in served else served[0]
    return defaults
