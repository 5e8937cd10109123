from embedstream.worker.offsets import OffsetTracker

TP = ("t", 0)


def test_commits_only_the_contiguous_done_prefix():
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.add(TP, offset)
    tracker.done(TP, 1)
    tracker.done(TP, 2)
    assert tracker.committable() == {}  # 0 is still in flight: no progress yet
    tracker.done(TP, 0)
    assert tracker.committable() == {TP: 3}
    tracker.committed({TP: 3})
    assert tracker.committable() == {}
    tracker.done(TP, 3)
    tracker.done(TP, 4)
    assert tracker.committable() == {TP: 5}


def test_partitions_are_independent_and_revoked_ones_forgotten():
    tracker = OffsetTracker()
    other = ("t", 1)
    tracker.add(TP, 10)
    tracker.add(other, 20)
    tracker.done(other, 20)
    assert tracker.committable() == {other: 21}  # TP's first event is still in flight
    assert tracker.in_flight() == 1
    assert tracker.in_flight([other]) == 0
    tracker.forget([TP])
    tracker.done(TP, 10)  # late completion of a revoked partition is ignored
    assert TP not in tracker.committable()
