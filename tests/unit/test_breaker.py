"""The crash-loop breaker: deaths counted per partition head, careful mode, quarantine.

Process deaths are simulated by dropping a worker without its clean exit (its
marks stay in the ledger), then starting a new one on the same ledger.
"""

from __future__ import annotations

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


def recs(*offsets: int) -> list[RawRecord]:
    return [RawRecord(TP[0], TP[1], o, None, b"{}", 0) for o in offsets]


def test_a_first_owner_processes_normally_and_leaves_a_mark_at_its_head():
    ledger = MemoryCrashLedger()
    b = breaker(ledger)
    assert [r.offset for r in b.admit(recs(5, 6))] == [5, 6]
    assert not b.careful()
    assert ledger.marks[TP] == Mark(5, 0)
    b.committed({TP: 7})
    assert ledger.marks[TP] == Mark(7, 0)  # progress moves the mark
    b.leave({TP})
    assert TP not in ledger.marks  # a clean exit leaves nothing behind


def test_a_death_without_progress_makes_the_next_owner_careful():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 0)  # the last owner died at 5
    b = breaker(ledger)
    b.admit(recs(5, 6))
    assert b.careful() and ledger.marks[TP] == Mark(5, 1)
    b.isolate(recs(5)[0])
    assert ledger.marks[TP] == Mark(5, 1, isolating=5)
    b.isolated_done()
    assert ledger.marks[TP] == Mark(5, 1)


def test_a_death_after_progress_is_not_counted():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(3, 1)  # an older mark, behind where the partition starts now
    b = breaker(ledger)
    b.admit(recs(5))
    assert not b.careful() and ledger.marks[TP] == Mark(5, 0)


def test_more_deaths_before_care_with_a_higher_threshold():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 0)
    b = breaker(ledger, max_deaths=3)
    b.admit(recs(5))
    assert not b.careful() and ledger.marks[TP] == Mark(5, 1)
    b2 = breaker(ledger, max_deaths=3)
    b2.admit(recs(5))
    assert b2.careful() and ledger.marks[TP] == Mark(5, 2)


def test_a_record_in_hand_alone_at_a_death_is_quarantined_and_the_rest_processed():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(5, 1, isolating=7)
    rejected: list[tuple[int, str]] = []
    b = breaker(ledger, rejected=rejected)
    assert [r.offset for r in b.admit(recs(5, 6, 7, 8))] == [5, 6, 8]
    assert rejected == [(7, "poison_quarantined")]
    assert not b.careful()


def test_careful_mode_ends_when_caught_up_or_past_the_window():
    ledger = MemoryCrashLedger()
    ledger.marks[TP] = Mark(0, 0)
    b = Breaker(ledger, 2, window=3, reject=lambda *a: None)
    held = b.admit(recs(0, 1, 2, 3))
    for record in held[:2]:
        b.isolate(record)
        assert b.careful()
    b.isolate(held[2])  # offset 2 = head + window - 1: the window is done
    assert not b.careful()
    ledger.marks[TP] = Mark(0, 0)
    b2 = Breaker(ledger, 2, window=100, reject=lambda *a: None)
    b2.admit(recs(0))
    b2.caught_up()
    assert not b2.careful()


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
