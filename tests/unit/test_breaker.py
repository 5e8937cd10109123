"""The crash-loop breaker: deaths counted per partition head, careful mode, quarantine.

Process deaths are simulated by dropping a worker without its clean exit (its
marks stay in the ledger), then starting a new one on the same ledger.
"""

from __future__ import annotations

import threading
import time

from embedstream.envelope import RawRecord
from embedstream.testing import MemoryCrashLedger
from embedstream.worker.quarantine import Breaker, Mark
from support.pipeline import make_worker, run_until, text_records

TP = ("embedstream.text", 0)


def breaker(ledger, max_deaths=2, rejected=None):
    def reject(record, reason, detail):
        if rejected is not None:
            rejected.append((record.offset, reason))

    return Breaker(ledger, max_deaths, window=100, reject=reject)


def state(ledger: MemoryCrashLedger, tp=TP) -> tuple | None:
    """A mark's (head, deaths, isolating), the owner's id left out."""
    mark = ledger.marks.get(tp)
    return None if mark is None else (mark.head, mark.deaths, mark.isolating)


def recs(*offsets: int) -> list[RawRecord]:
    return [RawRecord(TP[0], TP[1], o, None, b"{}", 0) for o in offsets]


def test_a_first_owner_processes_normally_and_leaves_a_mark_at_its_head():
    ledger = MemoryCrashLedger()
    b = breaker(ledger)
    assert [r.offset for r in b.admit(recs(5, 6))[0]] == [5, 6]
    assert not b.careful()
    assert state(ledger) == (5, 0, None)
    b.committed({TP: 7})
    assert state(ledger) == (7, 0, None)  # progress moves the mark
    b.leave({TP})
    assert TP not in ledger.marks  # a clean exit leaves nothing behind


def test_a_death_without_progress_makes_the_next_owner_careful():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 0)  # the last owner died at 5
    b = breaker(ledger)
    b.admit(recs(5, 6))
    assert b.careful() and state(ledger) == (5, 1, None)
    b.isolate(recs(5)[0])
    assert state(ledger) == (5, 1, 5)
    b.isolated_done()
    assert state(ledger) == (5, 1, None)


def test_a_death_after_progress_is_not_counted():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(3, 1)  # an older mark, behind where the partition starts now
    b = breaker(ledger)
    b.admit(recs(5))
    assert not b.careful() and state(ledger) == (5, 0, None)


def test_more_deaths_before_care_with_a_higher_threshold():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 0)
    b = breaker(ledger, max_deaths=3)
    b.admit(recs(5))
    assert not b.careful() and state(ledger) == (5, 1, None)
    b2 = breaker(ledger, max_deaths=3)
    b2.admit(recs(5))
    assert b2.careful() and state(ledger) == (5, 2, None)


def test_a_record_in_hand_alone_at_a_death_is_quarantined_and_the_rest_processed():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 1, isolating=7)
    rejected: list[tuple[int, str]] = []
    b = breaker(ledger, rejected=rejected)
    assert [r.offset for r in b.admit(recs(5, 6, 7, 8))[0]] == [5, 6, 8]
    assert rejected == [(7, "poison_quarantined")]
    assert not b.careful()


def test_careful_mode_ends_when_caught_up_or_past_the_window():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(0, 0)
    b = Breaker(ledger, 2, window=3, reject=lambda *a: None)
    held, _ = b.admit(recs(0, 1, 2, 3))
    for record in held[:2]:
        b.isolate(record)
        assert b.careful()
    b.isolate(held[2])  # offset 2 = head + window - 1: the window is done...
    assert b.careful() == {TP}  # ...but its last record is in hand alone, named in the mark
    assert state(ledger) == (0, 1, 2)
    b.isolated_done()
    assert not b.careful()
    ledger.marks[TP] = Mark(0, 0)
    b2 = Breaker(ledger, 2, window=100, reject=lambda *a: None)
    b2.admit(recs(0))
    b2.caught_up(TP)
    assert not b2.careful()


def test_a_mark_says_how_far_its_owner_admitted_before_anything_past_it_goes_in():
    ledger = FlakyLedger()
    b = breaker(ledger)
    b.admit(recs(5, 6))
    reach = ledger.marks[TP].reach
    assert reach is not None and reach > 6  # raised a little ahead: not a write per poll
    b.admit(recs(*range(7, reach)))
    assert ledger.marks[TP].reach == reach
    ledger.down = True  # past the reach the mark must say so first: without the store, wait
    process, later = b.admit(recs(reach, reach + 1))
    assert process == [] and [r.offset for r in later] == [reach, reach + 1]
    ledger.down = False
    process, later = b.admit(later)
    assert len(process) == 2 and later == [] and ledger.marks[TP].reach > reach + 1
    b.committed({TP: reach})  # progress keeps the reach: records past the head are in hand
    assert ledger.marks[TP].head == reach and ledger.marks[TP].reach > reach + 1


def test_careful_mode_covers_only_what_the_dead_could_have_held():
    """The dead owner admitted nothing at or past offset 8 (its mark's reach): the next
    owner is careful with 5, 6 and 7 only, not a whole window."""
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 0, owner="A", reach=8)
    b = breaker(ledger)
    held, _ = b.admit(recs(*range(5, 12)))
    assert ledger.marks[TP].reach >= 12  # its own admissions raise its mark's reach
    for record in held[:3]:
        assert b.careful() == {TP}
        assert b.isolate(record)
        b.isolated_done()
    assert not b.careful()
    # A later death counts the reach the dead owners carried, not only its own.
    ledger.marks[TP] = Mark(5, 1, owner="B", dead=("A",), reach=40)
    b2 = breaker(ledger, max_deaths=3)
    b2.admit(recs(5, 6))
    assert ledger.marks[TP].reach == 40 and b2.careful() == {TP}


def test_an_owner_that_died_before_admitting_a_record_of_a_partition_counts_no_death_there():
    """Taken over, but nothing admitted (here: revoked at once, the new assignment not
    known yet): its mark's reach is its head, so its death cannot be this partition's."""
    ledger = MemoryCrashLedger()
    b = Breaker(ledger, 2, window=100, reject=lambda *a: None, in_limbo=lambda tp: True)
    process, later = b.admit(recs(5, 6))
    assert process == [] and len(later) == 2 and ledger.marks[TP].reach == 5
    b2 = breaker(ledger)  # b died
    b2.admit(recs(5, 6))
    assert not b2.careful() and state(ledger) == (5, 0, None)


def test_a_careful_worker_feeds_the_pipeline_one_record_at_a_time(model):
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(0, 0)  # a process died here before
    sizes: list[int] = []
    real = model.backend.embed

    def embed(inputs):
        sizes.append(inputs["input_ids"].shape[0])
        return real(inputs)

    model.backend.embed = embed
    worker, source, sink, dlq = make_worker(model, text_records([f"w{i}" for i in range(8)]),
                                            ledger=ledger, poison_max_deaths=2)
    seen: list[int | None] = []
    write = ledger.write
    ledger.write = lambda marks: (seen.extend(m.isolating for m in marks.values()),  # type: ignore[method-assign]
                                  write(marks))[1]
    code = run_until(worker, lambda: source.committed.get(TP) == 8)
    assert code == 0 and len(sink.stored) == 8 and dlq.letters == []
    assert set(sizes) == {1}  # never two records in the model at once
    assert [o for o in seen if o is not None] == list(range(8))  # each announced alone, in order
    assert TP not in ledger.marks  # left cleanly


def test_a_worker_quarantines_the_record_a_process_died_holding_alone(model):
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(0, 1, isolating=2)
    worker, source, sink, dlq = make_worker(model, text_records(["w1", "w2", "w3", "w4"]),
                                            ledger=ledger)
    code = run_until(worker, lambda: source.committed.get(TP) == 4)
    assert code == 0
    assert [(r.offset, reason) for r, reason, _ in dlq.letters] == [(2, "poison_quarantined")]
    assert {key[1] for key in sink.stored} == {"p0-0", "p0-1", "p0-3"}
    assert "2 worker processes died" in dlq.letters[0][2]


def test_while_one_partition_is_careful_every_record_goes_alone_taking_turns(model):
    """A death must be pinned on the one record in hand, so nothing else may be in the
    pipeline with it: records of every partition go alone, partitions taking turns."""
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(0, 0)  # partition 0 is suspect; partition 1 is not
    firsts: list[int] = []
    real = model.backend.embed

    def embed(inputs):
        firsts.extend(int(t) for t in inputs["input_ids"][:, 0])
        assert inputs["input_ids"].shape[0] == 1, "two records in the model at once"
        return real(inputs)

    model.backend.embed = embed
    records = (text_records([f"w{i}" for i in range(6)], partition=0)
               + text_records([f"w{i}" for i in range(10, 16)], partition=1))
    worker, source, sink, _ = make_worker(model, records, ledger=ledger, poison_max_deaths=2)
    t1 = ("embedstream.text", 1)
    code = run_until(worker, lambda: source.committed.get(TP) == 6 and source.committed.get(t1) == 6)
    assert code == 0 and len(sink.stored) == 12
    partition_of = ["p0" if token < 13 else "p1" for token in firsts]  # w0..w5 vs w10..w15
    assert partition_of[:4] in (["p0", "p1", "p0", "p1"], ["p1", "p0", "p1", "p0"])  # turns


def test_a_death_pinned_elsewhere_explains_the_same_death_in_the_other_partitions():
    """One poison kills the process that holds several partitions: once the death is
    pinned on it, the other partitions do not count that death."""
    ledger = MemoryCrashLedger()
    other = ("embedstream.text", 1)
    # "first" died holding both partitions, then "dead" did, the poison alone in hand.
    ledger.marks[TP] = Mark(5, 1, isolating=5, owner="dead", dead=("first",))
    ledger.marks[other] = Mark(0, 1, owner="dead", dead=("first",))
    rejected: list[tuple[int, str]] = []
    b = breaker(ledger, max_deaths=3, rejected=rejected)
    b.admit([*recs(5, 6), RawRecord(other[0], other[1], 0, None, b"{}", 0)])
    assert rejected == [(5, "poison_quarantined")]
    assert not b.careful()  # partition 1's two deaths are explained, not counted
    assert state(ledger, other) == (0, 0, None)
    assert ledger.explained("dead") and ledger.explained("first")
    # Another process taking over a partition the dead ones held learns it from the ledger;
    # a death the poison does not explain ("third") still counts.
    ledger.marks[("embedstream.text", 2)] = Mark(0, 1, owner="dead", dead=("third",))
    b2 = breaker(ledger, max_deaths=3)
    b2.admit([RawRecord("embedstream.text", 2, 0, None, b"{}", 0)])
    assert not b2.careful() and state(ledger, ("embedstream.text", 2)) == (0, 1, None)
    assert ledger.marks[("embedstream.text", 2)].dead == ("third",)


def test_a_poison_pinned_explains_every_death_counted_at_its_head():
    """Process A dies holding the poison's partition and another; a survivor takes the
    other over, careful for A's death. B takes the poison's partition and dies with the
    poison alone in hand; B's mark names A's death at that head too. The process that
    quarantines the poison explains both, so the survivor's partition ends care at once
    instead of going one record at a time through its whole window."""
    ledger = MemoryCrashLedger()
    other = ("embedstream.text", 1)
    ledger.marks[other] = Mark(0, 0, owner="A")
    survivor = breaker(ledger)
    survivor.admit([RawRecord(other[0], other[1], 0, None, b"{}", 0)])
    assert survivor.careful() == {other}
    assert ledger.marks[other].dead == ("A",)

    ledger.marks[TP] = Mark(5, 0, owner="A")
    b = breaker(ledger)
    b.admit(recs(5, 6))
    assert ledger.marks[TP].dead == ("A",)  # B counts A's death and names it
    assert b.isolate(recs(5)[0])  # ... and dies with offset 5 alone in hand
    rejected: list[tuple[int, str]] = []
    breaker(ledger, rejected=rejected).admit(recs(5, 6))
    assert rejected == [(5, "poison_quarantined")]
    assert ledger.explained("A") and ledger.explained(b.owner)
    survivor.recheck()
    assert not survivor.careful() and state(ledger, other) == (0, 0, None)


def test_a_careful_partition_ends_care_once_its_death_is_explained_elsewhere():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(0, 1, owner="dead", dead=("first",))
    b = breaker(ledger, max_deaths=3)
    b.admit(recs(0))
    assert b.careful() == {TP}
    b.recheck()
    assert b.careful() == {TP}  # nothing explained yet
    ledger.explain("dead")  # another process quarantined what killed "dead"
    b.recheck()  # "first"'s death alone is under the threshold: care ends, the count stays
    assert not b.careful() and state(ledger) == (0, 1, None)


class FlakyLedger(MemoryCrashLedger):
    """A ledger whose store can be away (``down``)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def _check(self) -> None:
        if self.down:
            import redis

            raise redis.ConnectionError("Redis is away")

    def read(self, tp):
        self._check()
        return super().read(tp)

    def write(self, marks):
        self._check()
        super().write(marks)


def test_a_take_over_the_store_cannot_record_is_held_until_it_can():
    """A death during a Redis outage must count like any other: until a partition's mark
    is read and written, its records wait; a careful record goes in only once marked."""
    ledger = FlakyLedger()
    ledger.marks[TP] = Mark(5, 0)
    ledger.down = True
    b = breaker(ledger)
    process, later = b.admit(recs(5, 6))
    assert process == [] and [r.offset for r in later] == [5, 6]
    ledger.down = False
    process, later = b.admit(later)
    assert [r.offset for r in process] == [5, 6] and later == []
    assert b.careful() == {TP} and state(ledger) == (5, 1, None)  # the death was counted
    ledger.down = True
    assert not b.isolate(process[0])  # not marked: it must not go in
    ledger.down = False
    assert b.isolate(process[0]) and state(ledger) == (5, 1, 5)


def test_a_rebalance_in_a_crash_loop_hands_the_count_over_instead_of_resetting_it():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 0)  # an owner died at 5
    first = Breaker(ledger, 3, window=100, reject=lambda *a: None)
    first.admit(recs(5, 6))
    assert state(ledger) == (5, 1, None) and not first.careful()
    # Its partition is revoked before it got past 5, with nothing of it in hand (the
    # dead process restarted and joined): the death counted so far is handed over.
    first.leave({TP})
    assert state(ledger) == (5, 1, None) and ledger.marks[TP].handed_over
    second = Breaker(ledger, 3, window=100, reject=lambda *a: None)
    second.admit(recs(5, 6))
    assert state(ledger) == (5, 1, None) and not second.careful()  # not a death of its own
    # It dies at 5 too: the next owner counts two deaths and is careful.
    third = Breaker(ledger, 3, window=100, reject=lambda *a: None)
    third.admit(recs(5, 6))
    assert state(ledger) == (5, 2, None) and third.careful()


def test_leaving_with_records_in_hand_counts_a_later_death_but_names_no_poison():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 0)
    rejected: list = []
    b = breaker(ledger, rejected=rejected)  # careful at the first death (max 2)
    b.admit(recs(5, 6))
    assert b.careful() and b.isolate(recs(5)[0]) and state(ledger) == (5, 1, 5)
    b.leave({TP}, busy={TP})  # revoked while offset 5 is still in its pipeline
    assert state(ledger) == (5, 1, None) and not ledger.marks[TP].handed_over
    # The new owner counts the leaver as a possible death, but quarantines nothing:
    # the leaver may well have survived its record.
    nxt = breaker(ledger, rejected=rejected)
    admitted, _ = nxt.admit(recs(5, 6))
    assert [r.offset for r in admitted] == [5, 6] and rejected == []
    assert state(ledger) == (5, 2, None) and nxt.careful()


def test_leaving_cleanly_without_deaths_leaves_nothing():
    ledger = MemoryCrashLedger()
    b = breaker(ledger)
    b.admit(recs(5))
    b.leave({TP}, busy=set())
    assert TP not in ledger.marks


def test_a_revoke_unnames_the_record_in_hand_alone_before_the_next_owner_reads_the_mark():
    """A rebalance moves a careful partition while its owner, alive, has a record in hand
    alone: the next owner must not quarantine that record as if the owner had died."""
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 0)
    rejected: list = []
    b = breaker(ledger, rejected=rejected)
    b.admit(recs(5, 6))
    assert b.isolate(recs(5)[0]) and state(ledger) == (5, 1, 5)
    b.revoking({("embedstream.text", 9)})  # another partition: nothing changes
    assert state(ledger) == (5, 1, 5)
    b.revoking({TP})  # inside the rebalance, before anyone else owns TP
    assert state(ledger) == (5, 1, None)
    nxt = breaker(ledger, rejected=rejected)
    admitted, _ = nxt.admit(recs(5, 6))
    assert [r.offset for r in admitted] == [5, 6] and rejected == []


def test_a_partition_given_back_to_its_own_process_counts_no_death_of_it():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 0)
    b = breaker(ledger, max_deaths=3)
    b.admit(recs(5, 6))
    assert state(ledger) == (5, 1, None) and not b.careful()
    b.leave({TP}, busy={TP})  # revoked with records in hand: a plain mark of its own
    b.admit(recs(5, 6))  # and assigned back to it
    assert state(ledger) == (5, 1, None) and not b.careful()  # it did not die


def test_careful_mode_puts_its_first_record_in_only_once_the_pipeline_is_empty(model):
    """Records of another partition went in as a batch before careful mode began: the
    first record put in alone waits for them, or a death among them would be pinned on
    it."""
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(0, 0)  # partition 0 is suspect, and arrives second
    other = ("embedstream.text", 1)
    real = model.backend.embed
    in_model = threading.Event()

    def embed(inputs):
        in_model.set()
        time.sleep(0.05)
        return real(inputs)

    model.backend.embed = embed
    worker, source, sink, _ = make_worker(
        model, text_records([f"w{i}" for i in range(8)], partition=1), ledger=ledger,
        poison_max_deaths=2)
    stored_at_isolation: list[int] = []
    write = ledger.write

    def spy(marks):
        if any(m.isolating is not None for m in marks.values()):
            stored_at_isolation.append(len(sink.stored))
        write(marks)

    ledger.write = spy  # type: ignore[method-assign]

    def add_suspect_once_busy() -> bool:
        if in_model.is_set() and not stored_at_isolation and source.committed.get(TP) is None:
            in_model.clear()
            source.add(text_records(["s0", "s1"], partition=0))
        return source.committed.get(TP) == 2 and source.committed.get(other) == 8

    code = run_until(worker, add_suspect_once_busy, timeout=30)
    assert code == 0 and len(sink.stored) == 10
    assert stored_at_isolation and stored_at_isolation[0] == 8, stored_at_isolation


def test_a_partition_in_limbo_gets_no_record_alone_and_no_mark_written():
    """Between a revoke and the assignment that follows (a join can span several polls)
    the next owner may be reading the mark: nothing may name a record in hand there."""
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 0)
    limbo: set = set()
    b = Breaker(ledger, 2, window=100, reject=lambda *a: None, in_limbo=limbo.__contains__)
    b.admit(recs(5, 6, 7))
    assert b.isolate(recs(5)[0]) and state(ledger) == (5, 1, 5)
    b.revoking({TP})
    limbo.add(TP)
    assert state(ledger) == (5, 1, None)
    b.isolated_done()
    b.committed({TP: 6})
    assert state(ledger) == (5, 1, None)  # not written again while in limbo
    assert not b.isolate(recs(6)[0]) and state(ledger) == (5, 1, None)
    limbo.clear()  # it came back to this process
    assert b.isolate(recs(6)[0]) and state(ledger) == (5, 1, 6)
