"""The pre stage: records in, budgeted batches of model inputs out.

Per poll (merged with the polls queued behind it, see :meth:`PreStage.next_records`):
decode each record's envelope, pick its model, resolve binary payloads (inline,
raw bytes, claim-check URIs), preprocess (tokenize, decode images and audio),
split a text over its model's token limit into chunks (``text_overflow``), and
pack batches per model under the batch budget, the chunks of a document in one
batch. Deletes (tombstones, ``op: delete``) need no model: they go straight to
the sink stage, one deletion per model served for their topic.

Contract: every record handed to :meth:`PreStage.submit` leaves this stage in
exactly one way: inside a batch put on the batches queue (all its chunks in
one), as deletions put on the results queue, or rejected to the dead-letter
topic with its reason. Anything that goes wrong with one record,
whatever the exception, rejects that record alone (``internal_error`` with the
exception's type and message when no other reason names it); a batch-level
preprocessing call that fails is retried item by item, so its good items go on.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from embedstream import cloudevent
from embedstream.batching import Batch, BatchBudget, Batcher
from embedstream.envelope import HEADER_CONTENT_TYPE, Event, MetadataLimits, RawRecord, decode, header
from embedstream.errors import EnvelopeError
from embedstream.metrics import Metrics
from embedstream.models.routing import Routing
from embedstream.payloads import PayloadResolver
from embedstream.preprocess.base import Prepared
from embedstream.runtime.loader import LoadedModel
from embedstream.settings import Settings
from embedstream.sinks.base import Deletion
from embedstream.worker.deadletters import describe
from embedstream.worker.fanout import Fanout
from embedstream.worker.items import STOP, ChunkSpan, DeleteBatch, Item, WorkBatch, put
from embedstream.worker.liveness import Heartbeat

log = logging.getLogger(__name__)

_AUDIO_WINDOW_BATCHES = 4

Reject = Callable[[RawRecord, str, str], None]


@dataclass(slots=True)
class _ModelBatch:
    """One model's share of a poll: whole items, and groups (the chunks of a document)."""

    singles: list[tuple[Item, int]] = field(default_factory=list)
    groups: list[list[tuple[Item, int]]] = field(default_factory=list)
    truncated: int = 0


@dataclass(frozen=True, slots=True)
class _Alone:
    """Records to batch by themselves, at once (see :meth:`PreStage.submit`)."""

    records: list[RawRecord]

T = TypeVar("T")


class PreStage:
    """Decode, route, resolve, preprocess and batch. One thread runs :meth:`run`."""

    def __init__(
        self,
        settings: Settings,
        models: dict[str, LoadedModel],
        batches: queue.Queue[Any],
        reject: Reject,
        metrics: Metrics,
        heartbeat: Heartbeat,
        abandon: threading.Event,
        results: queue.Queue[Any] | None = None,
        routing: Routing | None = None,
        fanout: Fanout | None = None,
    ) -> None:
        self.settings = settings
        self._results = results
        self.modality_of = {settings.topic_for(m.modality): m.modality for m in models.values()}
        self._view = (dict(models), routing or Routing.plain(
            settings, {name: m.modality for name, m in models.items()}))
        self._known = dict(models)  # every model ever served here, by name (pre thread)
        self._fanout = fanout
        self._batches = batches
        self._reject = reject
        self._metrics = metrics
        self._heartbeat = heartbeat
        self._abandon = abandon
        self._payloads = PayloadResolver(settings.payloads)
        self._metadata_limits = MetadataLimits(settings.metadata_max_fields,
                                               settings.metadata_max_bytes)
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
        self._records: queue.Queue[Any] = queue.Queue()
        self._held: list[Any] = []  # a poll taken from _records but handled next

    @property
    def models(self) -> dict[str, LoadedModel]:
        """The models served now."""
        return self._view[0]

    @property
    def routing(self) -> Routing:
        return self._view[1]

    def apply(self, models: dict[str, LoadedModel], routing: Routing) -> None:
        """Serve ``models`` routed by ``routing`` from the next poll on (any thread: one
        assignment; a poll being prepared finishes with the set it started with)."""
        self._view = (dict(models), routing)

    # --------------------------------------------------------------- input
    def submit(self, records: list[RawRecord], *, alone: bool = False) -> None:
        """Hand a poll to the stage (any thread). ``alone``: batch these records by
        themselves and send them on at once (the crash-loop breaker's careful mode)."""
        self._records.put(_Alone(records) if alone else records)

    def drop(self, partitions: set[tuple[str, int]]) -> Counter[tuple[str, int]]:
        """Forget the queued records of partitions that went to another member (any
        thread): their new owner processes them; here they would be wasted work, or a
        death counted against nobody. Returns how many were dropped per partition."""
        dropped: Counter[tuple[str, int]] = Counter()

        def keep(item: Any) -> Any:
            if item is STOP:
                return item
            records = item.records if isinstance(item, _Alone) else item
            kept = [r for r in records if (r.topic, r.partition) not in partitions]
            dropped.update((r.topic, r.partition) for r in records
                           if (r.topic, r.partition) in partitions)
            if not kept:
                return None
            return _Alone(kept) if isinstance(item, _Alone) else kept

        with self._records.mutex:
            queued = [k for item in self._records.queue if (k := keep(item)) is not None]
            self._records.queue.clear()
            self._records.queue.extend(queued)
            self._held[:] = [k for item in self._held if (k := keep(item)) is not None]
        return dropped

    def finish(self) -> None:
        """No more records: flush the open batches and pass the stop marker on."""
        self._records.put(STOP)

    def run(self) -> None:
        batchers: dict[str, Batcher[Item]] = {name: Batcher(self.budget) for name in self.models}
        while not self._abandon.is_set():
            deadlines = [d for b in batchers.values() if (d := b.deadline()) is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.2
            records = self.next_records(timeout)
            if records is STOP:
                for name, batcher in batchers.items():
                    self._emit(name, batcher.flush())
                put(self._batches, STOP, self._abandon)
                return
            if isinstance(records, _Alone):
                self._heartbeat.busy()
                for name, batch in self.prepare(records.records).items():
                    items = [*batch.singles, *(pair for group in batch.groups for pair in group)]
                    if items:
                        self._emit(name, [Batch([i for i, _ in items], [c for _, c in items])])
            elif records:
                self._heartbeat.busy()
                for name, batch in self.prepare(records).items():
                    batcher = batchers.setdefault(name, Batcher(self.budget))
                    self._emit(name, batcher.add_many(batch.singles))
                    for group in batch.groups:
                        self._emit(name, batchers[name].add_group(group))
            for name, batcher in batchers.items():
                self._emit(name, batcher.due())
            self._heartbeat.idle()

    def next_records(self, timeout: float) -> Any:
        """The next poll (merged with the backlog of its kind), the stop marker, or None."""
        with self._records.mutex:  # drop() may filter the holdover from another thread
            holdover = self._held.pop() if self._held else None
        if holdover is not None:
            records = holdover
        else:
            try:
                records = self._records.get(timeout=timeout)
            except queue.Empty:
                return None
        if records is STOP or isinstance(records, _Alone):
            return records
        return self._drain_backlog(records)

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
        another kind, or the stop marker, ends the merge and is handled next.
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
            if more is STOP or isinstance(more, _Alone) or self._kind(more) != kind:
                with self._records.mutex:
                    self._held.append(more)
                break
            merged.extend(more)
            backlog = len(more) >= self.settings.max_poll_records
        return merged

    def _kind(self, records: list[RawRecord]) -> str | None:
        """The modality of every record of a poll, or None for a mixed poll."""
        kinds = {self.modality_of.get(r.topic) for r in records}
        return kinds.pop() if len(kinds) == 1 else None

    # ------------------------------------------------------------ per record
    def prepare(self, records: list[RawRecord]) -> dict[str, _ModelBatch]:
        """Decode and preprocess records, grouped by model: (item, cost) pairs, the
        chunks of a document grouped. Deletions go to the sink stage from here;
        records that cannot be embedded are rejected here, each with its reason."""
        started = time.perf_counter()
        models, routing = self._view
        self._known.update(models)
        by_model: dict[str, list[Event]] = {}
        deletions: list[Deletion] = []
        for record in records:
            self._metrics.consumed.labels(record.topic).inc()
            event = self._guarded(record, functools.partial(self._decode, record))
            self._heartbeat.beat()
            if event is None:
                continue
            if event.deletes:
                targets = self._guarded(record, functools.partial(
                    self._delete_targets, event, models, routing))
                deletions += [Deletion(event, model.manifest) for model in targets or ()]
                if targets == [] and self._fanout is not None:
                    self._fanout.done([(record.topic, record.partition, record.offset)])
                continue
            names = self._guarded(record, functools.partial(self._targets_of, event, models,
                                                            routing))
            if names is None:
                continue
            if not names and self._fanout is not None:  # not ours (a backfill): done
                self._fanout.done([(record.topic, record.partition, record.offset)])
            if self._fanout is not None:
                self._fanout.expect((record.topic, record.partition, record.offset), len(names))
            for name in names:
                by_model.setdefault(name, []).append(event)
        self._metrics.stage_seconds.labels("decode").observe(time.perf_counter() - started)
        if deletions and self._results is not None:
            self._heartbeat.idle()
            put(self._results, DeleteBatch(deletions), self._abandon)
            self._heartbeat.busy()

        out: dict[str, _ModelBatch] = {}
        for name, events in by_model.items():
            started = time.perf_counter()
            model = models[name]
            kept, inputs = self._inputs(events)
            batch = _ModelBatch()
            for event, result in zip(kept, self._preprocess(model, kept, inputs), strict=True):
                self._place(model, event, result, batch)
            if batch.truncated:
                self._metrics.truncated.labels(name).inc(batch.truncated)
            out[name] = batch
            stage = "tokenize" if model.modality == "text" else "preprocess"
            self._metrics.stage_seconds.labels(stage).observe(time.perf_counter() - started)
        return out

    def _place(self, model: LoadedModel, event: Event, result: Prepared | EnvelopeError,
               batch: _ModelBatch) -> None:
        """Put one preprocessed event in ``batch``: whole, truncated, chunked, or rejected."""
        if isinstance(result, EnvelopeError):
            self._reject(event.record, result.reason, result.detail)
            return
        overflow = self.settings.text_overflow
        if not result.truncated:
            batch.singles.append((Item(event, result), result.cost))
        elif overflow == "reject":
            self._reject(event.record, "text_too_long",
                         f"text is over the token limit of {model.name}")
        elif overflow == "chunk" and hasattr(model.preprocessor, "chunk") and event.text:
            group = self._guarded(event.record, functools.partial(self._chunk, model, event))
            if group:
                batch.groups.append(group)
        else:
            batch.truncated += 1
            batch.singles.append((Item(event, result), result.cost))

    def _chunk(self, model: LoadedModel, event: Event) -> list[tuple[Item, int]]:
        assert event.text is not None
        windows = model.preprocessor.chunk(  # type: ignore[attr-defined]
            event.text, self.settings.chunk_tokens, self.settings.chunk_overlap)
        count = len(windows)
        return [(Item(event, prepared, ChunkSpan(i, count, start, end)), prepared.cost)
                for i, ((start, end), prepared) in enumerate(windows)]

    def _delete_targets(self, event: Event, models: dict[str, LoadedModel],
                        routing: Routing) -> list[LoadedModel]:
        """The models a delete applies to: those that embed the model it names, else
        every one served for its modality (a tombstone names none)."""
        if event.model is not None:
            return [models[n] for n in self._targets_of(event, models, routing)]
        return [m for m in models.values() if m.modality == event.modality]

    def _guarded(self, record: RawRecord, step: Callable[[], T]) -> T | None:
        """``step()``, or None after rejecting ``record`` for whatever it raised."""
        try:
            return step()
        except EnvelopeError as err:
            self._reject(record, err.reason, err.detail)
        except Exception as err:  # unforeseen: about this record until proven otherwise
            log.warning("record %s:%d@%d: %s", record.topic, record.partition, record.offset,
                        describe(err), exc_info=True)
            self._reject(record, "internal_error", describe(err))
        return None

    def _decode(self, record: RawRecord) -> Event:
        modality = self.modality_of[record.topic]
        if modality == "text":
            event = decode(record, modality, self._max_record["text"], self._metadata_limits,
                           self.settings.tenant_from)
            if event.text is not None and len(event.text) > self.settings.max_text_chars:
                raise EnvelopeError(
                    "text_too_long",
                    f"text has {len(event.text)} characters, limit {self.settings.max_text_chars}",
                )
            return event
        ctype = header(record, HEADER_CONTENT_TYPE)
        json_form = ctype is None or ctype.lower().startswith(b"application/json") or (
            cloudevent.is_structured(record))
        form = "binary_json" if json_form else "binary_raw"
        return decode(record, modality, self._max_record[form], self._metadata_limits,
                      self.settings.tenant_from)

    def _targets_of(self, event: Event, models: dict[str, LoadedModel],
                    routing: Routing) -> tuple[str, ...]:
        """The models that embed ``event``: those its model (the one it names, else its
        modality's default) routes to, one unless a rollout dual-writes it."""
        name = event.model or routing.defaults.get(event.modality)
        targets = routing.targets.get(name) if name is not None else None
        if targets is None and routing.skip_others:
            return ()
        served = [models.get(t) for t in targets or ()]
        if not targets or any(m is None or m.modality != event.modality for m in served):
            raise EnvelopeError(
                "unknown_model",
                f"no {event.modality} model {name!r} is served here; served: "
                f"{sorted(n for n, m in models.items() if m.modality == event.modality)}",
            )
        return targets

    def _inputs(self, events: list[Event]) -> tuple[list[Event], list[Any]]:
        """The events whose input could be had, and those inputs (texts or file bytes)."""
        kept: list[Event] = []
        inputs: list[Any] = []
        for event in events:
            if event.modality == "text":
                data: Any = event.text or ""
            else:
                data = self._guarded(event.record, functools.partial(self._payloads.resolve, event))
                self._heartbeat.beat()
                if data is None:
                    continue
            kept.append(event)
            inputs.append(data)
        return kept, inputs

    def _preprocess(
        self, model: LoadedModel, events: list[Event], inputs: list[Any]
    ) -> list[Prepared | EnvelopeError]:
        """One result per input: batch-wise, or item by item when the batch call fails."""
        if not inputs:
            return []
        try:
            results = model.preprocessor.prepare(inputs)
            if len(results) == len(inputs):
                return results
            log.warning("%s: preprocessor returned %d results for %d inputs; retrying one by one",
                        model.name, len(results), len(inputs))
        except Exception as err:
            log.warning("%s: preprocessing a batch of %d failed (%s); retrying one by one",
                        model.name, len(inputs), describe(err))
        out: list[Prepared | EnvelopeError] = []
        for event, data in zip(events, inputs, strict=True):
            try:
                (result,) = model.preprocessor.prepare([data])
            except Exception as err:
                result = EnvelopeError("internal_error", describe(err))
                log.warning("record %s:%d@%d: %s", event.record.topic, event.record.partition,
                            event.record.offset, result.detail)
            out.append(result)
            self._heartbeat.beat()
        return out

    def _emit(self, name: str, batches: list[Batch[Item]]) -> None:
        for batch in batches:
            self._heartbeat.idle()  # waiting for room downstream is not this stage's stall
            put(self._batches, WorkBatch(self._known[name], batch.items, batch.padded_tokens),
                self._abandon)
            self._heartbeat.busy()
