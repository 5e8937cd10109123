"""The committer: which offsets are finished, what is in flight, when to commit.

It owns the :class:`~embedstream.worker.offsets.OffsetTracker`, the payload
bytes in flight (the memory budget), backpressure (pausing the consumer) and
the commits themselves. Contract:

* :meth:`track` is called for every polled record before it goes anywhere;
  :meth:`done` once it is stored or its dead letter is written. ``done`` may be
  called from any thread: completions queue up and are applied by the polling
  thread in :meth:`settle`.
* An offset is committed only when every earlier offset of its partition is
  done. Commits are sent every ``commit_interval_ms``, and always on a revoke
  and at shutdown (``settle(force=True)``).
* It is the source's :class:`~embedstream.sources.base.RebalanceListener`:
  :meth:`revoked` and :meth:`assigned` may run on the Kafka client's I/O
  thread (kafka-python runs rebalance listeners there), so the tracker and the
  in-flight sizes are guarded by one lock, taken by every method that touches
  them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable

from embedstream.envelope import RawRecord
from embedstream.metrics import Metrics
from embedstream.settings import Settings
from embedstream.sources.base import Source, TopicPartition
from embedstream.worker.items import Position
from embedstream.worker.offsets import OffsetTracker

log = logging.getLogger(__name__)

_LAG_INTERVAL_S = 5.0


class Committer:
    """See the module docstring. Methods are for the polling thread unless they say."""

    def __init__(self, settings: Settings, metrics: Metrics, max_in_flight: int) -> None:
        self._settings = settings
        self._metrics = metrics
        self.max_in_flight = max_in_flight
        self._tracker = OffsetTracker()
        self._sizes: dict[Position, int] = {}
        self._in_flight_bytes = 0
        self._lock = threading.Lock()
        self._done: queue.SimpleQueue[list[Position]] = queue.SimpleQueue()
        self._progress = threading.Event()
        self._source: Source | None = None
        self._last_commit = 0.0
        self._last_lag = 0.0
        self._on_commit: list[Callable[[dict[TopicPartition, int]], None]] = []
        self._on_lost: list[Callable[[dict[TopicPartition, int]], None]] = []
        self._on_revoked: list[Callable[[set[TopicPartition]], None]] = []
        self._limbo: set[TopicPartition] = set()  # revoked, not yet known to be lost

    def attach(self, source: Source) -> None:
        self._source = source

    def on_commit(self, listener: Callable[[dict[TopicPartition, int]], None]) -> None:
        """Call ``listener(offsets)`` after each commit the group accepted."""
        self._on_commit.append(listener)

    def on_lost(self, listener: Callable[[dict[TopicPartition, int]], None]) -> None:
        """Call ``listener(partitions)`` when partitions went to another member
        (from :meth:`assigned`, on the thread that runs it)."""
        self._on_lost.append(listener)

    def on_revoked(self, listener: Callable[[set[TopicPartition]], None]) -> None:
        """Call ``listener(partitions)`` inside :meth:`revoked`: before the rebalance
        completes, so before any other member can take the partitions over."""
        self._on_revoked.append(listener)

    @property
    def source(self) -> Source:
        assert self._source is not None, "attach() a source first"
        return self._source

    # ------------------------------------------------------------- tracking
    def track(self, records: Iterable[RawRecord]) -> None:
        """Records just polled are in flight from now on."""
        with self._lock:
            for r in records:
                self._tracker.add((r.topic, r.partition), r.offset)
                size = len(r.value or b"")
                self._sizes[(r.topic, r.partition, r.offset)] = size
                self._in_flight_bytes += size
            self._metrics.in_flight.set(self._tracker.in_flight())

    def tracked(self, tp: TopicPartition) -> bool:
        """True when ``tp`` has records tracked since it was (re)assigned."""
        with self._lock:
            return self._tracker.tracked(tp)

    def pending(self, pos: Position) -> bool:
        """True while the record at ``pos`` is in flight (completions applied so far)."""
        with self._lock:
            return self._tracker.pending((pos[0], pos[1]), pos[2])

    def done(self, positions: list[Position]) -> None:
        """Stored or dead-lettered. Any thread."""
        self._done.put(positions)
        self._progress.set()

    def wait_progress(self, timeout_s: float) -> None:
        """Block until a completion arrives (or ``timeout_s``)."""
        self._progress.wait(timeout_s)
        self._progress.clear()

    def in_flight(self) -> int:
        with self._lock:
            return self._tracker.in_flight()

    def in_limbo(self, tp: TopicPartition) -> bool:
        """True between the revoke of ``tp`` and the assignment that says whether it came
        back: another member may own it already (a join can span several polls)."""
        with self._lock:
            return tp in self._limbo

    def committable(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        with self._lock:
            return self._tracker.committable(tps)

    # -------------------------------------------------------------- commits
    def settle(self, *, force: bool = False) -> None:
        """Apply completions; commit the finished prefix when the interval is up (or ``force``)."""
        with self._lock:
            self._apply_done()
            self._metrics.in_flight.set(self._tracker.in_flight())
        now = time.monotonic()
        if force or now - self._last_commit >= self._settings.commit_interval_ms / 1000:
            self._last_commit = now
            self._commit(self.committable())
        if now - self._last_lag > _LAG_INTERVAL_S:
            self._last_lag = now
            for (topic, partition), lag in self.source.lag().items():
                self._metrics.consumer_lag.labels(topic, str(partition)).set(lag)

    def _apply_done(self) -> None:
        """Under the lock."""
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                return
            for topic, partition, offset in done:
                self._tracker.done((topic, partition), offset)
                self._in_flight_bytes -= self._sizes.pop((topic, partition, offset), 0)

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        if not offsets:
            return
        started = time.perf_counter()
        if self.source.commit(offsets):
            with self._lock:
                self._tracker.committed(offsets)
            self._metrics.commits.inc()
            for listener in self._on_commit:
                listener(offsets)
        self._metrics.stage_seconds.labels("commit").observe(time.perf_counter() - started)

    def apply_backpressure(self, held: int = 0) -> None:
        """Pause the consumer while too much is in flight (``held``: records kept back
        from the stages that count too); resume when the stages caught up."""
        with self._lock:
            over = (
                self._tracker.in_flight() + held >= self.max_in_flight
                or self._in_flight_bytes >= self._settings.max_in_flight_bytes
            )
        if over:
            self.source.pause()
        else:
            self.source.resume()

    # ------------------------------------------------------------ rebalances
    def revoked(self, revoked: set[TopicPartition]) -> None:
        """Before partitions may move: commit what is finished (see :class:`RebalanceListener`).

        Runs inside ``poll``: on kafka-python's I/O thread while the polling
        thread waits (confluent-kafka runs it on the polling thread itself), so
        it must not block: it applies the completions so far and sends their
        commit without waiting. The partitions stay tracked until :meth:`assigned`
        says which did not come back.
        """
        with self._lock:
            self._apply_done()
            offsets = self._tracker.committable(revoked)
            self._limbo |= revoked
        self.source.commit_nowait(offsets)
        for listener in self._on_revoked:
            listener(revoked)

    def assigned(self, assigned: set[TopicPartition]) -> None:
        """The new assignment: forget the revoked partitions that went elsewhere.

        Their events still in flight are redelivered to the new owner (those
        already stored by then are recognised there as duplicates). A partition
        that came back keeps its tracked offsets: the client may continue from
        its fetch position, so events polled before the revoke may not come
        again, and commits must still wait for them.
        """
        with self._lock:
            lost, self._limbo = self._limbo - assigned, set()
            in_flight = {tp: self._tracker.in_flight([tp]) for tp in lost}
            self._tracker.forget(lost)
            for pos in [p for p in self._sizes if (p[0], p[1]) in lost]:
                self._in_flight_bytes -= self._sizes.pop(pos)
        for topic, partition in lost:
            self._metrics.consumer_lag.labels(topic, str(partition)).set(0)
        if lost:
            for listener in self._on_lost:
                listener(in_flight)
