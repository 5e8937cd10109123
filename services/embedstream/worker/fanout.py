"""Records that more than one model embeds (a rollout's dual write): done when all are.

The pre stage calls :meth:`Fanout.expect` for a record it sends to ``n > 1``
models, before any of them can finish; every completion (stored, or its dead
letter written) then goes through :meth:`Fanout.done`, which hands a position
on to the committer only when its last model finished. So an offset is never
committed while one model's vector of it is still missing: a crash then
redelivers the record and both models embed it again (the other one's write is
a duplicate). Thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from embedstream.sources.base import TopicPartition
from embedstream.worker.items import Position


class Fanout:
    def __init__(self, done: Callable[[list[Position]], None]) -> None:
        self._done = done
        self._left: dict[Position, int] = {}
        self._lock = threading.Lock()

    def expect(self, pos: Position, models: int) -> None:
        """The record at ``pos`` finishes once per model, ``models`` times."""
        if models > 1:
            with self._lock:
                self._left[pos] = models

    def done(self, positions: list[Position]) -> None:
        """One model finished these records (any thread)."""
        finished: list[Position] = []
        with self._lock:
            for pos in positions:
                left = self._left.get(pos, 1) - 1
                if left > 0:
                    self._left[pos] = left
                else:
                    self._left.pop(pos, None)
                    finished.append(pos)
        if finished:
            self._done(finished)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions that went to another member: their records are redelivered there."""
        lost = set(partitions)
        with self._lock:
            for pos in [p for p in self._left if (p[0], p[1]) in lost]:
                del self._left[pos]

    def waiting(self) -> int:
        with self._lock:
            return len(self._left)
