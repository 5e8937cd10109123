"""Which offsets may be committed: the lowest unfinished one per partition.

Events finish out of order (batches are length-sorted, dead letters are
acknowledged asynchronously), but a committed offset means "everything
before this is stored". So per partition the committable offset is the
smallest offset still in flight, or one past the highest seen when none is.
"""

from __future__ import annotations

from collections.abc import Iterable

from embedstream.sources.base import TopicPartition


class OffsetTracker:
    """Not thread-safe: the committer guards it with its lock."""

    def __init__(self) -> None:
        self._pending: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def add(self, tp: TopicPartition, offset: int) -> None:
        """An event at ``offset`` was consumed and is now in flight."""
        self._pending.setdefault(tp, set()).add(offset)
        # Where consumption started is where the group already stands: committing
        # it again would be a no-op, so progress starts from there.
        self._committed.setdefault(tp, offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TopicPartition, offset: int) -> None:
        """The event is stored or dead-lettered. Unknown partitions are ignored:
        they were revoked while the event was in flight."""
        pending = self._pending.get(tp)
        if pending is not None:
            pending.discard(offset)

    def pending(self, tp: TopicPartition, offset: int) -> bool:
        """True while the event at ``offset`` is in flight."""
        return offset in self._pending.get(tp, ())

    def tracked(self, tp: TopicPartition) -> bool:
        """True once a record of ``tp`` was added since it was assigned (or forgotten)."""
        return tp in self._next

    def in_flight(self, tps: Iterable[TopicPartition] | None = None) -> int:
        keys = self._pending.keys() if tps is None else tps
        return sum(len(self._pending.get(tp, ())) for tp in keys)

    def committable(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Offsets to commit now: those that moved past the last commit."""
        out = {}
        for tp in list(self._pending if tps is None else tps):
            if tp not in self._next:
                continue
            pending = self._pending.get(tp)
            offset = min(pending) if pending else self._next[tp]
            if offset > self._committed.get(tp, -1):
                out[tp] = offset
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            self._committed[tp] = max(self._committed.get(tp, -1), offset)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Drop partitions that moved to another worker."""
        for tp in tps:
            self._pending.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
