"""The sink stage: result batches in, stored (and announced) documents out; deletions applied.

Contract: every document of a result batch (its chunks come together) leaves
this stage in exactly one way: stored in the store (and, with the results
stream, announced) and then done, or rejected to the dead-letter topic
(``store_rejected``: the store refused it for its own data). Every deletion is
applied (or found stale or already applied), announced, counted, then done.
Failures of the store itself (unreachable, busy, failing over, out of memory)
are about the world: the whole batch is retried with a jittered backoff,
nothing of it is done (so nothing is committed) meanwhile, readiness goes
false, and an out-of-memory store is counted and reported on its own so an
operator can make room. A shutdown abandons the retry: the batch
stays uncommitted and is redelivered.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embedstream.errors import Cancelled, SinkError, StoreFull
from embedstream.metrics import Metrics
from embedstream.retry import Backoff, retry
from embedstream.sinks.base import Chunk, Embedded, Rejected, Sink, WriteOutcome
from embedstream.sinks.results import ResultsPublisher
from embedstream.worker.deadletters import describe
from embedstream.worker.items import STOP, DeleteBatch, Item, Position, ResultBatch, position
from embedstream.worker.liveness import Heartbeat
from embedstream.worker.pre import Reject

log = logging.getLogger(__name__)

_BACKOFF = Backoff(initial_s=0.1, max_s=5.0)


class SinkStage:
    """Writes result batches; one thread runs :meth:`run`."""

    def __init__(
        self,
        sink: Sink,
        results_in: queue.Queue[Any],
        reject: Reject,
        done: Callable[[list[Position]], None],
        metrics: Metrics,
        heartbeat: Heartbeat,
        abandon: threading.Event,
        announcer: ResultsPublisher | None = None,
        backoff: Backoff = _BACKOFF,
    ) -> None:
        self.sink = sink
        self._in = results_in
        self._reject = reject
        self._done = done
        self._metrics = metrics
        self._heartbeat = heartbeat
        self._abandon = abandon
        self.announcer = announcer
        self._backoff = backoff
        self.store_ok = True
        """False while writes fail for the store's sake (readiness)."""
        self.store_full = False
        """True while the store refuses writes for lack of memory (readiness, alert)."""

    def run(self) -> None:
        while not self._abandon.is_set():
            try:
                result = self._in.get(timeout=0.1)
            except queue.Empty:
                continue
            if result is STOP:
                return
            self._heartbeat.busy()
            try:
                if isinstance(result, DeleteBatch):
                    self.delete(result)
                else:
                    self.store(result)
            except Cancelled:
                return  # abandoned while the store was away: nothing of it is committed
            finally:
                self._heartbeat.idle()

    def store(self, result: ResultBatch) -> None:
        """Write one result batch, reject what the store refused, announce, then done."""
        documents = _documents(result)
        embedded = [doc for doc, _ in documents]
        started = time.perf_counter()
        outcome = self._write(embedded)
        self._metrics.stage_seconds.labels("sink").observe(time.perf_counter() - started)
        refused = {r.index for r in outcome.rejected}
        for rejection in outcome.rejected:
            self._reject(embedded[rejection.index].event.record, rejection.reason,
                         rejection.detail)
        done = [doc for i, doc in enumerate(embedded) if i not in refused]
        # A stale document (a newer version or a newer delete is stored) was left as it
        # was: announcing it would tell the results stream an older state than the store's.
        stale = set(outcome.stale_at)
        fresh = [doc for i, doc in enumerate(embedded) if i not in refused and i not in stale]
        if self.announcer is not None and fresh:
            self._retry(functools.partial(self.announcer.publish, fresh),
                        "results stream unavailable")
        self._count(result.model.name, done, outcome)
        if done:
            self._done([position(doc.event.record) for doc in done])

    def delete(self, batch: DeleteBatch) -> None:
        """Apply deletions (versioned, see the sink), announce them, then done."""
        started = time.perf_counter()
        outcome = self._retry(functools.partial(self.sink.delete, batch.deletions),
                              "store unavailable", on_success=self._store_back)
        self._metrics.stage_seconds.labels("sink").observe(time.perf_counter() - started)
        if self.announcer is not None:
            self._retry(functools.partial(self.announcer.publish, batch.deletions),
                        "results stream unavailable")
        for deletion in batch.deletions:
            self._metrics.deleted.labels(deletion.model.name).inc()
        if outcome.stale:
            self._metrics.stale.labels(batch.deletions[0].model.name).inc(outcome.stale)
        self._done(list(dict.fromkeys(position(d.event.record) for d in batch.deletions)))

    def _store_back(self) -> None:
        self.store_ok = True
        self.store_full = False

    def _write(self, embedded: list[Embedded]) -> WriteOutcome:
        on_success = self._store_back
        try:
            return self._retry(lambda: self.sink.write(embedded), "store unavailable",
                               on_success=on_success)
        except Cancelled:
            raise
        except Exception as err:  # unforeseen: about the items until proven otherwise
            log.warning("write of %d failed (%s); writing them one by one",
                        len(embedded), describe(err), exc_info=True)
        outcomes: list[WriteOutcome] = []
        for index, item in enumerate(embedded):
            try:
                one = self._retry(functools.partial(self.sink.write, [item]),
                                  "store unavailable", on_success=on_success)
            except Cancelled:
                raise
            except Exception as err:
                one = WriteOutcome(rejected=(Rejected(0, describe(err), "internal_error"),))
            finally:
                self._heartbeat.beat()
            outcomes.append(WriteOutcome(
                one.stored, one.duplicates,
                tuple(Rejected(index, r.detail, r.reason) for r in one.rejected),
                (index,) if one.stale_at else (),
            ))
        return WriteOutcome(
            stored=sum(o.stored for o in outcomes),
            duplicates=sum(o.duplicates for o in outcomes),
            rejected=tuple(r for o in outcomes for r in o.rejected),
            stale_at=tuple(i for o in outcomes for i in o.stale_at),
        )

    def _retry(self, call: Callable[[], Any], what: str,
               on_success: Callable[[], None] | None = None) -> Any:
        def on_retry(err: BaseException, delay: float) -> None:
            self._heartbeat.beat()  # waiting out the world is progress of its own
            self.store_ok = False
            self._metrics.sink_retries.inc()
            if isinstance(err, StoreFull):
                if not self.store_full:
                    log.error("Redis is out of memory: writes paused until it has room "
                              "(raise maxmemory or free space); nothing is lost: %s", err)
                self.store_full = True
                self._metrics.store_full.inc()
            log.warning("%s, retrying in %.1fs: %s", what, delay, err)

        return retry(call, transient=(SinkError,), backoff=self._backoff, cancel=self._abandon,
                     on_retry=on_retry, on_success=on_success)

    def _count(self, name: str, stored: list[Embedded], outcome: WriteOutcome) -> None:
        self._metrics.embedded.labels(name).inc(outcome.stored)
        if outcome.duplicates:
            self._metrics.duplicates.labels(name).inc(outcome.duplicates)
        if outcome.stale:
            self._metrics.stale.labels(name).inc(outcome.stale)
        chunks = sum(n for n in (len(doc.parts()) for doc in stored) if n > 1)
        if chunks:
            self._metrics.chunks.labels(name).inc(chunks)
        now_ms = time.time() * 1000
        e2e = self._metrics.end_to_end_seconds.labels(name)
        for doc in stored:
            e2e.observe(max(0.0, now_ms - doc.event.record.timestamp_ms) / 1000)


def _documents(result: ResultBatch) -> list[tuple[Embedded, list[Item]]]:
    """The batch's items as documents: the chunks of one record together, in order."""
    tokens: list[np.ndarray | None] = (
        list(result.tokens) if result.tokens is not None else [None] * len(result.items)
    )
    by_record: dict[Position, list[tuple[Item, np.ndarray, np.ndarray | None]]] = {}
    for item, vector, item_tokens in zip(result.items, result.vectors, tokens, strict=True):
        by_record.setdefault(position(item.event.record), []).append((item, vector, item_tokens))
    documents: list[tuple[Embedded, list[Item]]] = []
    manifest = result.model.manifest
    for parts in by_record.values():
        event = parts[0][0].event
        if parts[0][0].chunk is None:
            item, vector, item_tokens = parts[0]
            documents.append((Embedded(event, manifest, vector, item_tokens), [item]))
            continue
        parts.sort(key=lambda part: part[0].chunk.index)  # type: ignore[union-attr]
        chunks = tuple(
            Chunk(item.chunk.index, item.chunk.start, item.chunk.end, vector, item_tokens)
            for item, vector, item_tokens in parts if item.chunk is not None
        )
        documents.append((Embedded(event, manifest, chunks=chunks), [p[0] for p in parts]))
    return documents
