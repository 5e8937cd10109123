"""In-memory sources, sinks and dead letters for unit tests of pipeline logic.

They honour the same contracts as the real ones (see ``sources/base.py`` and
``sinks/base.py``), so a test of the worker's logic needs no broker or Redis.
Integration tests use the real embedded stack instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from embedstream.envelope import Event, RawRecord
from embedstream.errors import Backpressure, SinkError, StoreFull
from embedstream.models.manifest import Manifest
from embedstream.sinks.base import DeleteOutcome, Deletion, Embedded, Rejected, WriteOutcome
from embedstream.sources.base import RebalanceListener, TopicPartition
from embedstream.worker.quarantine import Mark


class MemorySource:
    """Serves queued records once each; remembers commits; can simulate a revoke
    (``revoke_next``: the next poll revokes these partitions, and they go elsewhere)."""

    def __init__(self, records: list[RawRecord], listener: RebalanceListener) -> None:
        self._records = list(records)
        self._listener = listener
        self._lock = threading.Lock()
        self.committed: dict[TopicPartition, int] = {}
        self.paused = False
        self.closed = False
        self.revoke_next: set[TopicPartition] = set()
        self.given_back: set[TopicPartition] = set()
        """Partitions of a revoke that the rebalance assigns to this consumer again."""

    def add(self, records: list[RawRecord]) -> None:
        with self._lock:
            self._records.extend(records)

    def poll(self, timeout_s: float) -> list[RawRecord]:
        if self.revoke_next:
            revoked, self.revoke_next = self.revoke_next, set()
            self._listener.revoked(revoked)
            self._listener.assigned(revoked & self.given_back)
        if self.paused:
            return []
        with self._lock:
            batch, self._records = self._records[:100], self._records[100:]
        return batch

    def commit(self, offsets: dict[TopicPartition, int]) -> bool:
        for tp, offset in offsets.items():
            assert offset >= self.committed.get(tp, 0), "commits must not go backwards"
            self.committed[tp] = offset
        return True

    def commit_nowait(self, offsets: dict[TopicPartition, int]) -> None:
        self.commit(offsets)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def connected(self) -> bool:
        return True

    def lag(self) -> dict[TopicPartition, int]:
        return {}

    def close(self) -> None:
        self.closed = True


class MemorySink:
    """Stores documents in a dict keyed (model, id), with Redis's versioning rules
    (and its delete markers, kept forever here).

    ``fail_next`` simulates outages (the next writes raise :class:`SinkError`),
    ``full_next`` a store out of memory (:class:`StoreFull`), and an event whose
    id is in ``refuse_ids`` is refused for its data (rejected, the rest stored).
    """

    def __init__(self) -> None:
        self.stored: dict[tuple[str, str], Embedded] = {}
        self.markers: dict[tuple[str, str], tuple[int, int, int]] = {}
        self.writes = 0
        self.fail_next = 0
        self.full_next = 0
        self.refuse_ids: set[str] = set()
        self.prepared: list[Manifest] = []
        self.closed = False

    def prepare(self, models: list[Manifest]) -> None:
        self.prepared = list(models)

    def write(self, results: list[Embedded]) -> WriteOutcome:
        if self.fail_next:
            self.fail_next -= 1
            raise SinkError("simulated outage")
        if self.full_next:
            self.full_next -= 1
            raise StoreFull("simulated OOM command not allowed")
        self.writes += 1
        stored = duplicates = 0
        stale_at: list[int] = []
        rejected: list[Rejected] = []
        for index, result in enumerate(results):
            if result.event.id in self.refuse_ids:
                rejected.append(Rejected(index, "simulated WRONGTYPE"))
                continue
            key = (result.model.name, result.event.id)
            current = self.stored.get(key)
            order = _order(result.event)
            if current is not None and _order(current.event) > order:
                stale_at.append(index)
            elif current is not None and _order(current.event) == order:
                duplicates += 1
            elif key in self.markers and self.markers[key] >= order:
                stale_at.append(index)
            else:
                self.stored[key] = result
                self.markers.pop(key, None)
                stored += 1
        return WriteOutcome(stored, duplicates, tuple(rejected), tuple(stale_at))

    def delete(self, deletions: list[Deletion]) -> DeleteOutcome:
        if self.fail_next:
            self.fail_next -= 1
            raise SinkError("simulated outage")
        deleted = absent = stale = duplicates = 0
        for item in deletions:
            key = (item.model.name, item.event.id)
            order = _order(item.event)
            newest = max([self.markers.get(key, (-1, -1, -1)),
                          *([_order(self.stored[key].event)] if key in self.stored else [])])
            if newest > order:
                stale += 1
            elif newest == order:
                duplicates += 1
            else:
                deleted += key in self.stored
                absent += key not in self.stored
                self.stored.pop(key, None)
                self.markers[key] = order
        return DeleteOutcome(deleted, absent, stale, duplicates)

    def ping(self) -> bool:
        return not self.fail_next

    def close(self) -> None:
        self.closed = True


def _order(event: Event) -> tuple[int, int, int]:
    """What the Redis scripts compare: version, then offset, then partition."""
    return (event.version, event.record.offset, event.record.partition)


class MemoryCrashLedger:
    """Crash-loop marks in a dict (see :class:`~embedstream.worker.quarantine.CrashLedger`)."""

    def __init__(self) -> None:
        self.marks: dict[TopicPartition, Mark] = {}
        self.explained_owners: set[str] = set()

    def read(self, tp: TopicPartition) -> Mark | None:
        return self.marks.get(tp)

    def write(self, marks: dict[TopicPartition, Mark]) -> None:
        self.marks.update(marks)

    def clear(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self.marks.pop(tp, None)

    def explain(self, owner: str) -> None:
        self.explained_owners.add(owner)

    def explained(self, owner: str) -> bool:
        return owner in self.explained_owners


class MemoryDeadLetters:
    """Collects dead letters; acknowledges them at once."""

    def __init__(self) -> None:
        self.letters: list[tuple[RawRecord, str, str]] = []

    def send(
        self,
        record: RawRecord,
        reason: str,
        detail: str,
        on_done: Callable[[], None],
        on_error: Callable[[Exception], None],
    ) -> None:
        self.letters.append((record, reason, detail))
        on_done()

    def flush(self, timeout_s: float) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryResults:
    """Collects "embedding ready" announcements; ``fail_next`` simulates a broker outage.

    With ``sink``, checks the results contract: nothing is announced before it is stored.
    """

    def __init__(self, sink: MemorySink | None = None) -> None:
        self.announced: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str]] = []
        self.fail_next = 0
        self.closed = False
        self._sink = sink

    def publish(self, results: Sequence[Embedded | Deletion]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise SinkError("simulated results outage")
        for result in results:
            key = (result.model.name, result.event.id)
            if isinstance(result, Deletion):
                self.deleted.append(key)
                continue
            assert self._sink is None or key in self._sink.stored, f"{key} announced unstored"
            self.announced.append(key)

    def close(self) -> None:
        self.closed = True


class MemoryPublisher:
    """The gateway's publisher in memory: ``published`` holds (topic, key, value),
    ``headers`` each record's headers (same order); ``backpressure`` makes every
    publish raise :class:`Backpressure`."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str | None, bytes | None]] = []
        self.headers: list[dict[str, bytes]] = []
        self.backpressure = False
        self.closed = False

    def publish(self, topic: str, records: Sequence[tuple[str | None, bytes | None]],
                headers: Sequence[tuple[str, bytes]] = ()) -> None:
        if self.backpressure:
            raise Backpressure("simulated full buffer", retry_after_s=3)
        self.published.extend((topic, key, value) for key, value in records)
        self.headers.extend(dict(headers) for _ in records)

    def ready(self) -> bool:
        return not self.backpressure

    def close(self) -> None:
        self.closed = True
