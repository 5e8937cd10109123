"""The crash-loop breaker: a record that kills worker processes is quarantined, not retried forever.

Catching exceptions cannot save a process from a segfault in a native decoder
or the OOM killer: it dies with the record uncommitted, the next owner of the
partition receives it again, and dies too. The breaker ends that loop with a
small *mark* per partition in the store (:class:`CrashLedger`), which only a
process that dies leaves behind:

1. A process taking over a partition reads its mark. No mark, or a mark whose
   ``head`` (the committed offset) is behind where the partition now starts:
   the last owner made progress or left cleanly; normal processing. It writes
   its own mark, updates it at each commit and, when it leaves (revoke,
   shutdown) with nothing of the partition in hand, deletes it, or hands it
   over with the deaths counted so far (so a rebalance, which every restart in
   a crash loop causes, does not reset the count). Leaving with records still
   in the pipeline keeps a plain mark: should one of them kill the process
   after the hand-over, that death is counted too.
2. A mark at the very offset where the partition starts means the last owner
   died without getting past it: ``deaths + 1`` (unless its reach says it had
   admitted no record of the partition: then its death was not about it). After ``max_deaths - 1``
   such deaths the new owner is *careful* with that partition, for the
   records the dead owners could have had in hand (the mark's ``reach``: an
   owner raises it, a little ahead, before it admits a record past it; at most
   ``window``, as many as a process can hold in flight) or until it has
   caught up with the partition's end: meanwhile the process
   puts records into its pipeline one at a time, of every partition it holds,
   taking turns between partitions, and writes the offset of the one in hand
   (``isolating``) to its partition's mark first. The first such record goes in
   only once the records that went in before careful mode are done: alone means
   alone in the process. A partition revoked while its record is in hand alone
   has ``isolating`` cleared from its mark inside the rebalance, before the next
   owner can read it: a live owner's rebalance is not a death. Until the new
   assignment is known (a join can span several polls) nothing of a revoked
   partition goes in alone and its mark is not written again.
3. A mark with ``isolating`` set means a process died with that record alone
   in its pipeline: the record is the poison. The next owner dead-letters it
   as ``poison_quarantined`` without processing it, and goes on normally.

So a record is quarantined after ``max_deaths`` process deaths at its
partition's head, the last one with that record alone in hand: no other
record, of its partition or another, is ever quarantined for it. Each mark names the
process that wrote it, and the processes whose deaths it counts; once a death
is pinned on a record, the death of that process and of every process counted
at that head before it is *explained* (a set beside the marks), and the other
partitions they held stop counting those deaths (and stop being careful once
what is left is under the threshold), so one poison does not slow the whole
assignment for long. What the breaker cannot tell apart is a death
for a cause outside the pipeline at that very moment (the OOM killer, a lost
node): the record then goes to the dead-letter topic, where ``replay dlq
--reason poison_quarantined`` can re-drive it. The marks expire after a week;
while the store is unreachable, a partition taken over is held back until its
mark could be read and written (nothing could be stored meanwhile anyway), and
a careful partition's next record goes in only once its mark says so: a death
during an outage is counted like any other.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any, Protocol

import redis

from embedstream.envelope import RawRecord
from embedstream.sinks.cluster import Client, is_cluster
from embedstream.sources.base import TopicPartition

log = logging.getLogger(__name__)

_MARK_TTL_S = 7 * 24 * 3600
_UNAVAILABLE = (redis.RedisError, OSError, ValueError)
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
    owner: str = ""
    """The worker process that wrote the mark (a random id per process)."""
    handed_over: bool = False
    """Its owner gave the partition up with nothing of it in hand: not a death. (The
    deaths before it still count: a rebalance does not reset a crash loop.)"""
    dead: tuple[str, ...] = ()
    """The processes whose deaths ``deaths`` counts, where known (at most the last
    :data:`_NAMED_DEATHS`): when a poison is pinned at this head, each is explained."""
    reach: int | None = None
    """No record at or past this offset was admitted by the owner (nor by the dead ones
    it counts): a death here can only be from a record before it. None: not known."""


_NAMED_DEATHS = 16
_REACH_AHEAD = 256
"""How far past the last admitted record a mark's ``reach`` is raised, so that a mark
is written once per so many records rather than at every poll."""


def _victims(mark: Mark) -> tuple[str, ...]:
    """Every death ``mark`` counts, by process id ("" where it is not known)."""
    return ("",) * max(0, mark.deaths - len(mark.dead)) + mark.dead


def _named(victims: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v for v in victims if v)[-_NAMED_DEATHS:]


class CrashLedger(Protocol):
    """Where marks live: shared by every worker of the group. Errors raise ``redis.RedisError``."""

    def read(self, tp: TopicPartition) -> Mark | None: ...

    def write(self, marks: dict[TopicPartition, Mark]) -> None: ...

    def clear(self, tps: set[TopicPartition]) -> None: ...

    def explain(self, owner: str) -> None:
        """The death of ``owner`` is pinned on a record it held alone."""
        ...

    def explained(self, owner: str) -> bool: ...


# Marks are written by scripts flagged allow-oom: they are a few bytes, and a Redis out
# of memory (which the sink waits out) must not blind the breaker meanwhile.
_WRITE_MARK = """#!lua flags=allow-oom
redis.call('HSET', KEYS[1], 'head', ARGV[1], 'deaths', ARGV[2], 'isolating', ARGV[3],
           'owner', ARGV[4], 'handed_over', ARGV[6], 'dead', ARGV[7], 'reach', ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
_EXPLAIN = """#!lua flags=allow-oom
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class RedisCrashLedger:
    """Marks as small hashes ``<prefix>:!crashloop:<group>:<topic>:<partition>`` (``!``
    cannot occur in a model name, so no model's index covers them)."""

    def __init__(self, client: Client, prefix: str, group: str) -> None:
        self._client = client
        self._base = f"{prefix}:!crashloop:{group}"
        self._write_mark = client.register_script(_WRITE_MARK)
        self._explain = client.register_script(_EXPLAIN)

    def key(self, tp: TopicPartition) -> str:
        return f"{self._base}:{tp[0]}:{tp[1]}"

    def read(self, tp: TopicPartition) -> Mark | None:
        raw: dict[bytes, bytes] = self._client.hgetall(self.key(tp))  # type: ignore[assignment]
        if not raw or b"head" not in raw:
            return None
        isolating = raw.get(b"isolating", b"")
        dead = raw.get(b"dead", b"").decode("utf-8", "replace")
        reach = raw.get(b"reach", b"")
        return Mark(int(raw[b"head"]), int(raw.get(b"deaths", b"0")),
                    int(isolating) if isolating else None,
                    raw.get(b"owner", b"").decode("utf-8", "replace"),
                    raw.get(b"handed_over", b"0") == b"1",
                    tuple(o for o in dead.split(",") if o),
                    int(reach) if reach else None)

    def write(self, marks: dict[TopicPartition, Mark]) -> None:
        # A cluster's pipeline does not load scripts: there, one call per mark (rare).
        pipe = None if is_cluster(self._client) else self._client.pipeline(transaction=False)
        for tp, mark in marks.items():
            isolating = "" if mark.isolating is None else mark.isolating
            self._write_mark(keys=[self.key(tp)], client=pipe,
                             args=[mark.head, mark.deaths, isolating, mark.owner, _MARK_TTL_S,
                                   int(mark.handed_over), ",".join(mark.dead),
                                   "" if mark.reach is None else mark.reach])
        if pipe is not None:
            pipe.execute()

    def clear(self, tps: set[TopicPartition]) -> None:
        if tps:
            self._client.delete(*(self.key(tp) for tp in tps))

    def explain(self, owner: str) -> None:
        self._explain(keys=[f"{self._base}:explained"], args=[owner, _MARK_TTL_S])

    def explained(self, owner: str) -> bool:
        return bool(self._client.sismember(f"{self._base}:explained", owner))


class Breaker:
    """The breaker's decisions for one worker process. Polling thread only."""

    def __init__(
        self,
        ledger: CrashLedger | None,
        max_deaths: int,
        window: int,
        reject: Callable[[RawRecord, str, str], None],
        in_limbo: Callable[[TopicPartition], bool] = lambda tp: False,
    ) -> None:
        self._ledger = ledger
        # Revoked, the new assignment not known yet (a join can span several polls): the
        # next owner may be reading the partition's mark already, so it is not written.
        self._in_limbo = in_limbo
        self._max_deaths = max_deaths
        self._window = window
        self._reject = reject
        self._heads: dict[TopicPartition, int] = {}
        self._deaths: dict[TopicPartition, tuple[str, ...]] = {}  # see _victims
        self._careful_until: dict[TopicPartition, int] = {}
        self._careful_deaths: dict[TopicPartition, tuple[str, ...]] = {}  # what made it careful
        self._reach: dict[TopicPartition, int] = {}  # as written in the mark
        self._poison: dict[TopicPartition, tuple[int, int]] = {}  # offset, deaths
        self._isolating: tuple[TopicPartition, int] | None = None
        self._explained: set[str] = set()
        self.owner = uuid.uuid4().hex[:12]
        self._warned = 0.0

    def careful(self) -> set[TopicPartition]:
        """The partitions whose records must be processed one at a time: those in careful
        mode, and the one whose record is in hand alone until that record is done. (The
        last record of a careful window is still named in its mark: should the process
        die with it, it is taken for the poison, so nothing may join it meanwhile, and
        the ``crash_loop_careful`` gauge must not read 0 yet.)"""
        alone = {self._isolating[0]} if self._isolating is not None else set()
        return set(self._careful_until) | alone

    def admit(self, records: list[RawRecord]) -> tuple[list[RawRecord], list[RawRecord]]:
        """(records to process, records to hold back and admit again later).

        Quarantined records are dead-lettered here instead. Records of a partition
        whose take-over could not be recorded (the store is away) are held back.
        """
        starts: dict[TopicPartition, int] = {}
        for record in records:
            starts.setdefault((record.topic, record.partition), record.offset)
        new = {tp: start for tp, start in starts.items() if tp not in self._heads}
        if new:
            self._take_over(new)
        out: list[RawRecord] = []
        later: list[RawRecord] = []
        for record in records:
            tp = (record.topic, record.partition)
            if tp not in self._heads:
                later.append(record)
                continue
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
        return self._within_reach(out, later)

    def _within_reach(self, records: list[RawRecord], later: list[RawRecord]
                      ) -> tuple[list[RawRecord], list[RawRecord]]:
        """Raise the marks' ``reach`` past ``records`` before they are admitted; the
        records of a partition whose mark cannot say so (store away, in limbo) wait."""
        tops: dict[TopicPartition, int] = {}
        for record in records:
            tp = (record.topic, record.partition)
            tops[tp] = max(tops.get(tp, 0), record.offset + 1)
        raise_ = {tp: top for tp, top in tops.items() if top > self._reach.get(tp, 0)}
        if not raise_:
            return records, later
        blocked = {tp for tp in raise_ if self._in_limbo(tp)}
        marks = {tp: self._mark(tp, self._heads[tp], self._in_hand(tp), top + _REACH_AHEAD)
                 for tp, top in raise_.items() if tp not in blocked}
        if marks and self._write(marks):
            self._reach.update((tp, mark.reach) for tp, mark in marks.items()
                               if mark.reach is not None)
        else:
            blocked |= set(marks)
        if not blocked:
            return records, later
        return ([r for r in records if (r.topic, r.partition) not in blocked],
                [*later, *(r for r in records if (r.topic, r.partition) in blocked)])

    def _take_over(self, starts: dict[TopicPartition, int]) -> None:
        """Partitions seen for the first time since they were assigned: read their marks
        (all together: a death pinned in one explains the same death in the others) and
        write this owner's. Partitions whose marks cannot be read or written stay not
        taken over (their records are held back and admitted again)."""
        marks: dict[TopicPartition, Mark | None] = {}
        for tp in starts:
            try:
                marks[tp] = self._ledger.read(tp) if self._ledger is not None else None
            except _UNAVAILABLE as err:
                self._warn(err)
        for tp, mark in marks.items():
            if mark is not None and mark.isolating is not None \
                    and mark.head <= starts[tp] <= mark.isolating:
                self._poison[tp] = (mark.isolating, mark.deaths + 1)
                for owner in sorted({mark.owner, *mark.dead} - {""}):
                    self._explained.add(owner)
                    self._call("explain", owner)
                log.warning("%s:%d: a worker died processing offset %d alone: quarantining it",
                            *tp, mark.isolating)
        deaths = {tp: self._deaths_at(tp, starts[tp], mark) for tp, mark in marks.items()}
        # Deaths carried over carry what the dead could have held: their reach. Otherwise
        # nothing is admitted yet: the reach is the start.
        reach = {tp: mark.reach if mark is not None and deaths[tp] else starts[tp]
                 for tp, mark in marks.items()}
        written = {tp: Mark(starts[tp], len(d), owner=self.owner, dead=_named(d), reach=reach[tp])
                   for tp, d in deaths.items()}
        if not self._write(written):
            for tp in written:
                self._careful_until.pop(tp, None)
                self._careful_deaths.pop(tp, None)
            return
        for tp, mark in written.items():
            self._heads[tp] = mark.head
            self._deaths[tp] = deaths[tp]
            if mark.reach is not None:
                self._reach[tp] = mark.reach

    def _deaths_at(self, tp: TopicPartition, start: int, mark: Mark | None) -> tuple[str, ...]:
        """The deaths of owners at ``start`` that nothing explains, by process (none if the
        last owner passed it); makes ``tp`` careful past the threshold."""
        if mark is None or mark.head != start or tp in self._poison:
            return ()
        deaths = _victims(mark)
        if not (mark.handed_over or mark.owner == self.owner
                or (mark.reach is not None and mark.reach <= start)):
            # The last owner died here. (Otherwise it left cleanly, or it is this very
            # process, the partition come back to it, or it had admitted no record of it:
            # no new death here; the earlier ones stand.)
            deaths = (*deaths, mark.owner)
        unexplained = self._unexplained(deaths)
        if len(unexplained) < len(deaths):
            log.info("%s:%d: %d of the deaths at offset %d are explained by a quarantined "
                     "record", *tp, len(deaths) - len(unexplained), start)
        if unexplained and len(unexplained) >= self._max_deaths - 1:
            # Up to the last record the dead could have held, known from their reach.
            window = start + self._window
            self._careful_until[tp] = (window if mark.reach is None
                                       else max(start + 1, min(window, mark.reach)))
            self._careful_deaths[tp] = unexplained
            log.warning(
                "%s:%d: %d worker process(es) died at offset %d without passing it "
                "(processes %s; admitted below %s): processing up to %d records one at a "
                "time to find the one that kills",
                *tp, len(unexplained), start, ",".join(o or "?" for o in unexplained),
                "?" if mark.reach is None else mark.reach, self._careful_until[tp] - start,
            )
        return unexplained

    def _unexplained(self, deaths: tuple[str, ...]) -> tuple[str, ...]:
        """``deaths`` less those pinned on a quarantined record (here or by another process)."""
        out = []
        for owner in deaths:
            if owner and (owner in self._explained or self._call("explained", owner)):
                self._explained.add(owner)
            else:
                out.append(owner)
        return tuple(out)

    def _mark(self, tp: TopicPartition, head: int, isolating: int | None = None,
              reach: int | None = None) -> Mark:
        """This owner's mark of ``tp``: its deaths and reach as they stand."""
        deaths = self._deaths.get(tp, ())
        return Mark(head, len(deaths), isolating, self.owner, dead=_named(deaths),
                    reach=reach if reach is not None else self._reach.get(tp))

    def _in_hand(self, tp: TopicPartition) -> int | None:
        """The offset of ``tp``'s record in hand alone, if there is one."""
        return self._isolating[1] if self._isolating and self._isolating[0] == tp else None

    def isolate(self, record: RawRecord) -> bool:
        """``record`` goes into the pipeline alone: say so in its partition's mark first.
        False when the mark could not be written: then it must not go in yet."""
        tp = (record.topic, record.partition)
        if self._in_limbo(tp):
            return False
        if not self._write({tp: self._mark(tp, self._heads.get(tp, record.offset), record.offset)}):
            return False
        self._isolating = (tp, record.offset)
        until = self._careful_until.get(tp)
        if until is not None and record.offset + 1 >= until:
            del self._careful_until[tp]
        return True

    def isolated_done(self) -> None:
        """The record in hand alone is stored or dead-lettered: it is not the poison."""
        if self._isolating is None:
            return
        tp, _offset = self._isolating
        self._isolating = None
        if tp in self._heads and not self._in_limbo(tp):
            self._write({tp: self._mark(tp, self._heads[tp])})

    def revoking(self, tps: set[TopicPartition]) -> None:
        """``tps`` may move to another member: this process is alive, so a record of theirs
        in hand alone must not be read as its killer by the next owner. Their mark stops
        naming it now, inside the rebalance, before any other member can read the mark
        (the hand-over proper, :meth:`leave`, comes once the new assignment is known).
        Runs inside ``poll`` (on kafka-python's I/O thread while the polling thread waits)."""
        if self._isolating is None or self._isolating[0] not in tps:
            return
        tp = self._isolating[0]
        if tp in self._heads:
            self._write({tp: self._mark(tp, self._heads[tp])})

    def recheck(self) -> None:
        """End careful mode where the deaths that caused it have since been explained (a
        poison quarantined in another partition the dead processes held), down to fewer
        than would make a partition careful."""
        for tp, deaths in list(self._careful_deaths.items()):
            if tp not in self._careful_until:
                del self._careful_deaths[tp]
                continue
            left = self._unexplained(deaths)
            if left and len(left) >= self._max_deaths - 1:
                continue
            del self._careful_until[tp], self._careful_deaths[tp]
            if self._deaths.get(tp):  # (no progress since: the deaths are still at its head)
                self._deaths[tp] = left
            self._write({tp: self._mark(tp, self._heads[tp], self._in_hand(tp))})
            log.info("%s:%d: the deaths here are explained by a quarantined record: "
                     "processing its records in batches again", *tp)

    def caught_up(self, tp: TopicPartition) -> None:
        """Nothing of ``tp`` is held and nothing is left to fetch: whatever a dead owner
        held is behind us."""
        if self._careful_until.pop(tp, None) is not None:
            log.info("%s:%d caught up: processing its records in batches again", *tp)

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Progress: the next owner starts past these offsets, so their marks move on."""
        marks: dict[TopicPartition, Mark] = {}
        for tp, offset in offsets.items():
            if tp not in self._heads or offset <= self._heads[tp] or self._in_limbo(tp):
                continue
            self._heads[tp] = offset
            self._deaths[tp] = ()
            isolating = self._in_hand(tp)
            marks[tp] = self._mark(tp, offset, isolating if isolating is not None
                                   and isolating >= offset else None)
        if marks:
            self._write(marks)

    def leave(
        self, tps: set[TopicPartition], busy: AbstractSet[TopicPartition] = frozenset()
    ) -> None:
        """These partitions go to another member (revoked, or a shutdown).

        With nothing of a partition in hand, no death is left to report: its mark is
        cleared, or handed over with the deaths counted so far (a rebalance in a crash
        loop must not reset it). A ``busy`` partition still has records in the pipeline
        here, which may yet kill this process after the new owner took over: its mark
        stays a plain one (the new owner counts a death at that head, but quarantines
        nothing on it, since no record is named alone in hand)."""
        tps = {tp for tp in tps if tp in self._heads}
        marks: dict[TopicPartition, Mark] = {}
        for tp in tps:
            mark = self._mark(tp, self._heads.pop(tp))
            self._deaths.pop(tp, None)
            self._reach.pop(tp, None)
            if tp in busy:
                marks[tp] = mark
            elif mark.deaths:
                marks[tp] = replace(mark, handed_over=True)
            self._careful_until.pop(tp, None)
            self._careful_deaths.pop(tp, None)
            self._poison.pop(tp, None)
        if self._isolating and self._isolating[0] in tps:
            self._isolating = None
        if marks:
            self._write(marks)
        if tps - set(marks):
            self._call("clear", tps - set(marks))

    def owned(self) -> set[TopicPartition]:
        return set(self._heads)

    def _write(self, marks: dict[TopicPartition, Mark]) -> bool:
        """Write marks; False when the ledger is unreachable (True without a ledger)."""
        if self._ledger is None:
            return True
        try:
            self._ledger.write(marks)
        except _UNAVAILABLE as err:
            self._warn(err)
            return False
        return True

    def _call(self, method: str, *args: Any) -> Any:
        """``ledger.<method>(*args)``; None without a ledger or when it is unreachable."""
        if self._ledger is None:
            return None
        try:
            return getattr(self._ledger, method)(*args)
        except _UNAVAILABLE as err:
            self._warn(err)
            return None

    def _warn(self, err: Exception) -> None:
        now = time.monotonic()
        if now - self._warned > _WARN_EVERY_S:
            self._warned = now
            log.warning("crash-loop marks unavailable (%s); holding back what needs them", err)
