"""The crash-loop breaker: a record that kills worker processes is quarantined, not retried forever.

Catching exceptions cannot save a process from a segfault in a native decoder
or the OOM killer: it dies with the record uncommitted, the next owner of the
partition receives it again, and dies too. The breaker ends that loop with a
small *mark* per partition in the store (:class:`CrashLedger`), which only a
process that dies leaves behind:

1. A process taking over a partition reads its mark. No mark, or a mark whose
   ``head`` (the committed offset) is behind where the partition now starts:
   the last owner made progress or left cleanly; normal processing. It writes
   its own mark, updates it at each commit and deletes it when it leaves
   cleanly (revoke, shutdown).
2. A mark at the very offset where the partition starts means the last owner
   died without getting past it: ``deaths + 1``. After ``max_deaths - 1``
   such deaths the new owner is *careful*: it processes records one at a time,
   writing the offset of the one in hand (``isolating``) to the mark first, for
   up to ``window`` records of that partition (as many as a process can hold in
   flight) or until it has caught up.
3. A mark with ``isolating`` set means a process died holding that record and
   nothing else: the record is the poison. The next owner dead-letters it as
   ``poison_quarantined`` without processing it, and goes on normally.

So a record is quarantined after ``max_deaths`` process deaths, the last one
with that record alone in hand: an innocent neighbour is never quarantined for
it. The marks expire after a week; the breaker is best effort when the store
is unreachable (then nothing could be stored anyway).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis

from embedstream.envelope import RawRecord
from embedstream.sources.base import TopicPartition

log = logging.getLogger(__name__)

_MARK_TTL_S = 7 * 24 * 3600
_WARN_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class Mark:
    """What a partition's current owner leaves for the next one, should it die."""

    head: int
    """The partition's committed offset when the mark was written."""
    deaths: int = 0
    """Owners that died at this head before the one that wrote the mark."""
    isolating: int | None = None
    """The offset the owner was processing alone (careful mode), if any."""


class CrashLedger(Protocol):
    """Where marks live: shared by every worker of the group. Errors raise ``redis.RedisError``."""

    def read(self, tp: TopicPartition) -> Mark | None: ...

    def write(self, marks: dict[TopicPartition, Mark]) -> None: ...

    def clear(self, tps: set[TopicPartition]) -> None: ...


class RedisCrashLedger:
    """Marks as small hashes ``<prefix>:crashloop:<group>:<topic>:<partition>``."""

    def __init__(self, client: redis.Redis, prefix: str, group: str) -> None:
        self._client = client
        self._base = f"{prefix}:crashloop:{group}"

    def key(self, tp: TopicPartition) -> str:
        return f"{self._base}:{tp[0]}:{tp[1]}"

    def read(self, tp: TopicPartition) -> Mark | None:
        raw: dict[bytes, bytes] = self._client.hgetall(self.key(tp))  # type: ignore[assignment]
        if not raw or b"head" not in raw:
            return None
        isolating = raw.get(b"isolating", b"")
        return Mark(int(raw[b"head"]), int(raw.get(b"deaths", b"0")),
                    int(isolating) if isolating else None)

    def write(self, marks: dict[TopicPartition, Mark]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for tp, mark in marks.items():
            key = self.key(tp)
            pipe.hset(key, mapping={
                "head": mark.head, "deaths": mark.deaths,
                "isolating": "" if mark.isolating is None else mark.isolating,
            })
            pipe.expire(key, _MARK_TTL_S)
        pipe.execute()

    def clear(self, tps: set[TopicPartition]) -> None:
        if tps:
            self._client.delete(*(self.key(tp) for tp in tps))


class Breaker:
    """The breaker's decisions for one worker process. Polling thread only."""

    def __init__(
        self,
        ledger: CrashLedger | None,
        max_deaths: int,
        window: int,
        reject: Callable[[RawRecord, str, str], None],
    ) -> None:
        self._ledger = ledger
        self._max_deaths = max_deaths
        self._window = window
        self._reject = reject
        self._heads: dict[TopicPartition, int] = {}
        self._deaths: dict[TopicPartition, int] = {}
        self._careful_until: dict[TopicPartition, int] = {}
        self._poison: dict[TopicPartition, tuple[int, int]] = {}  # offset, deaths
        self._isolating: tuple[TopicPartition, int] | None = None
        self._warned = 0.0

    def careful(self) -> bool:
        """True while records must be processed one at a time."""
        return bool(self._careful_until)

    def admit(self, records: list[RawRecord]) -> list[RawRecord]:
        """The records to process; quarantined ones are dead-lettered here instead."""
        out: list[RawRecord] = []
        for record in records:
            tp = (record.topic, record.partition)
            if tp not in self._heads:
                self._take_over(tp, record.offset)
            poison = self._poison.get(tp)
            if poison is not None and poison[0] == record.offset:
                del self._poison[tp]
                self._careful_until.pop(tp, None)
                self._reject(
                    record, "poison_quarantined",
                    f"{poison[1]} worker processes died with this record in flight, the last "
                    "one processing it alone; it was not processed again",
                )
                continue
            out.append(record)
        return out

    def _take_over(self, tp: TopicPartition, start: int) -> None:
        mark = self._call(lambda: self._ledger.read(tp) if self._ledger else None)
        self._heads[tp] = start
        deaths = 0
        if mark is not None and mark.isolating is not None and mark.head <= start <= mark.isolating:
            self._poison[tp] = (mark.isolating, mark.deaths + 1)
            log.warning("%s:%d: a worker died processing offset %d alone: quarantining it",
                        *tp, mark.isolating)
        elif mark is not None and mark.head == start:
            deaths = mark.deaths + 1
            if deaths >= self._max_deaths - 1:
                self._careful_until[tp] = start + self._window
                log.warning(
                    "%s:%d: %d worker process(es) died at offset %d without passing it: "
                    "processing up to %d records one at a time to find the one that kills",
                    *tp, deaths, start, self._window,
                )
        self._deaths[tp] = deaths
        self._write({tp: Mark(start, deaths)})

    def isolate(self, record: RawRecord) -> None:
        """``record`` goes into the pipeline alone: say so in its partition's mark first."""
        tp = (record.topic, record.partition)
        self._isolating = (tp, record.offset)
        self._write({tp: Mark(self._heads.get(tp, record.offset), self._deaths.get(tp, 0),
                              record.offset)})
        until = self._careful_until.get(tp)
        if until is not None and record.offset + 1 >= until:
            del self._careful_until[tp]

    def isolated_done(self) -> None:
        """The record in hand alone is stored or dead-lettered: it is not the poison."""
        if self._isolating is None:
            return
        tp, _offset = self._isolating
        self._isolating = None
        if tp in self._heads:
            self._write({tp: Mark(self._heads[tp], self._deaths.get(tp, 0))})

    def caught_up(self) -> None:
        """Nothing polled and nothing held: whatever a dead owner held is behind us."""
        if self._careful_until:
            log.info("caught up: processing records in batches again")
            self._careful_until.clear()

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Progress: the next owner starts past these offsets, so their marks move on."""
        marks: dict[TopicPartition, Mark] = {}
        for tp, offset in offsets.items():
            if tp not in self._heads or offset <= self._heads[tp]:
                continue
            self._heads[tp] = offset
            self._deaths[tp] = 0
            isolating = (self._isolating[1] if self._isolating and self._isolating[0] == tp
                         and self._isolating[1] >= offset else None)
            marks[tp] = Mark(offset, 0, isolating)
        if marks:
            self._write(marks)

    def leave(self, tps: set[TopicPartition]) -> None:
        """These partitions are left cleanly (revoked, or a shutdown): no death to report."""
        tps = {tp for tp in tps if tp in self._heads}
        for tp in tps:
            self._heads.pop(tp, None)
            self._deaths.pop(tp, None)
            self._careful_until.pop(tp, None)
            self._poison.pop(tp, None)
        if self._isolating and self._isolating[0] in tps:
            self._isolating = None
        if tps and self._ledger is not None:
            ledger = self._ledger
            self._call(lambda: ledger.clear(tps))

    def owned(self) -> set[TopicPartition]:
        return set(self._heads)

    def _write(self, marks: dict[TopicPartition, Mark]) -> None:
        if self._ledger is not None:
            ledger = self._ledger
            self._call(lambda: ledger.write(marks))

    def _call(self, action: Callable[[], Mark | None]) -> Mark | None:
        try:
            return action()
        except (redis.RedisError, OSError, ValueError) as err:
            now = time.monotonic()
            if now - self._warned > _WARN_EVERY_S:
                self._warned = now
                log.warning("crash-loop marks unavailable (%s); processing without them", err)
            return None
