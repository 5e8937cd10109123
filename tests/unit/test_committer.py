"""The committer: commits on an interval and on demand; its state is guarded for the revoke."""

from __future__ import annotations

import threading
import time

from embedstream.envelope import RawRecord
from embedstream.metrics import Metrics
from embedstream.settings import Settings
from embedstream.testing import MemorySource
from embedstream.worker.committer import Committer

TP = ("t", 0)


def committer(interval_ms: int) -> tuple[Committer, MemorySource, list[dict]]:
    c = Committer(Settings(commit_interval_ms=interval_ms), Metrics(), max_in_flight=100)
    source = MemorySource([], c)
    commits: list[dict] = []
    commit = source.commit
    source.commit = lambda offsets: (commits.append(dict(offsets)), commit(offsets))[1]  # type: ignore[method-assign]
    c.attach(source)
    return c, source, commits


def test_commits_wait_for_the_interval_but_a_forced_settle_commits_at_once():
    c, source, commits = committer(interval_ms=60_000)
    c.settle()  # the first settle starts the clock
    for offset in range(10):
        c.track([RawRecord("t", 0, offset, None, b"x", 0)])
        c.done([("t", 0, offset)])
        c.settle()
    assert commits == []  # within the interval: no commit per pass
    c.settle(force=True)
    assert source.committed == {TP: 10}


def test_every_pass_commits_with_a_zero_interval():
    c, _, commits = committer(interval_ms=0)
    for offset in range(3):
        c.track([RawRecord("t", 0, offset, None, b"x", 0)])
        c.done([("t", 0, offset)])
        c.settle()
    assert commits == [{TP: 1}, {TP: 2}, {TP: 3}]


def test_a_revoke_from_another_thread_waits_for_the_polling_thread_to_let_go():
    c, source, _ = committer(interval_ms=0)
    c.track([RawRecord("t", 0, 0, None, b"x", 0)])
    c.done([("t", 0, 0)])
    finished = threading.Event()
    with c._lock:  # the polling thread is in the middle of tracking
        thread = threading.Thread(target=lambda: (c.revoked({TP}), c.assigned(set()),
                                                  finished.set()))
        thread.start()
        time.sleep(0.2)
        assert not finished.is_set()  # the I/O thread did not touch the tracker meanwhile
    thread.join(5)
    assert finished.is_set() and source.committed == {TP: 1} and c.in_flight() == 0
