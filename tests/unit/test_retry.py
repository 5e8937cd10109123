"""The one retry primitive: jittered, growing delays; a shutdown cancels the wait."""

from __future__ import annotations

import threading
import time

import pytest

from embedstream.errors import Cancelled, SinkError
from embedstream.retry import Backoff, RetryScheduler, retry


def test_delays_grow_to_the_cap_and_are_jittered_within_their_upper_half():
    backoff = Backoff(initial_s=0.1, max_s=1.0, factor=2.0, jitter=0.5)
    for attempt, ceiling in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (40, 1.0)]:
        delays = {backoff.delay(attempt) for _ in range(200)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 100  # drawn, not fixed: workers do not retry in lockstep


def test_retry_returns_after_transient_failures_and_reports_each():
    calls: list[int] = []
    retries: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise SinkError("away")
        return "ok"

    result = retry(flaky, transient=(SinkError,), backoff=Backoff(0.001, 0.002),
                   cancel=threading.Event(), on_retry=lambda _e, d: retries.append(d))
    assert result == "ok" and len(calls) == 3 and len(retries) == 2


def test_other_exceptions_are_not_retried():
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        retry(broken, transient=(SinkError,), backoff=Backoff(0.001), cancel=threading.Event())
    assert calls == [1]


def test_a_shutdown_cancels_the_wait_at_once():
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        retry(lambda: (_ for _ in ()).throw(SinkError("away")), transient=(SinkError,),
              backoff=Backoff(initial_s=30.0, max_s=30.0, jitter=0.0), cancel=cancel)
    assert time.monotonic() - started < 10  # not the 30 s delay


def test_the_scheduler_runs_actions_in_due_order_on_one_thread_and_drops_them_on_close():
    scheduler = RetryScheduler()
    ran: list[tuple[str, str]] = []
    done = threading.Event()
    before = threading.active_count()
    scheduler.schedule(0.2, lambda: (ran.append(("late", threading.current_thread().name)),
                                     done.set()))
    for i in range(50):
        scheduler.schedule(0.05, lambda i=i: ran.append((f"early-{i}", threading.current_thread().name)))
    assert threading.active_count() == before  # no thread per scheduled action
    assert done.wait(5)
    assert [name for name, _ in ran][-1] == "late" and len(ran) == 51
    assert len({thread for _, thread in ran}) == 1
    scheduler.schedule(60, lambda: ran.append(("never", "")))
    assert scheduler.pending() == 1
    scheduler.close()
    assert scheduler.pending() == 0
