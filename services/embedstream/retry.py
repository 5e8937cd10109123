"""The one retry primitive: jittered exponential backoff that a shutdown cancels.

Everything that waits out the world retries through here: the sink's writes
and announcements, the dead letters, the gateway's broker connection. Two
ways to use it:

* :func:`retry` calls a function until it returns, sleeping a jittered,
  growing delay after each transient failure; a set ``cancel`` event ends the
  wait at once with :class:`~embedstream.errors.Cancelled`.
* :class:`RetryScheduler` runs delayed retries of asynchronous operations (a
  dead letter whose delivery failed) on one thread, instead of one thread or
  one sleeping caller per failure.

Jitter ("full jitter" over the upper half of the delay) keeps a pool of
workers that lost Redis together from retrying in lockstep when it returns.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from embedstream.errors import Cancelled

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays of ``initial_s * factor**attempt``, capped at ``max_s``, each drawn
    uniformly from its upper ``jitter`` fraction (0: no jitter)."""

    initial_s: float = 0.1
    max_s: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (0 for the first failure)."""
        ceiling = min(self.max_s, self.initial_s * self.factor ** min(attempt, 64))
        return ceiling * (1.0 - self.jitter * random.random())


def retry(
    call: Callable[[], T],
    *,
    transient: tuple[type[BaseException], ...],
    backoff: Backoff,
    cancel: threading.Event,
    on_retry: Callable[[BaseException, float], None] | None = None,
    on_success: Callable[[], None] | None = None,
) -> T:
    """``call()`` until it returns; exceptions of ``transient`` types are retried.

    Any other exception propagates at once. ``on_retry(error, delay)`` runs
    before each wait (count it, log it, report not-ready); ``on_success`` after
    the call that worked. Raises :class:`Cancelled` when ``cancel`` is set
    before or during a wait.
    """
    attempt = 0
    while True:
        if cancel.is_set():
            raise Cancelled("retry cancelled: shutting down")
        try:
            result = call()
        except transient as err:
            delay = backoff.delay(attempt)
            attempt += 1
            if on_retry is not None:
                on_retry(err, delay)
            if cancel.wait(delay):
                raise Cancelled("retry cancelled: shutting down") from err
            continue
        if on_success is not None:
            on_success()
        return result


class RetryScheduler:
    """Runs callables after a delay, in due order, on one daemon thread.

    ``close`` drops what is still pending: callers that need the work done
    (a dead letter not yet written) leave it uncommitted, so it is redone by
    whoever consumes the record next.
    """

    def __init__(self, name: str = "embedstream-retry") -> None:
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        with self._cond:
            if self._closed:
                return
            heapq.heappush(self._queue, (time.monotonic() + delay_s, next(self._order), action))
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (
                    not self._queue or self._queue[0][0] > time.monotonic()
                ):
                    timeout = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._cond.wait(timeout)
                if self._closed:
                    return
                _, _, action = heapq.heappop(self._queue)
            try:
                action()
            except Exception:  # an action's failure must not end the scheduler
                log.exception("scheduled retry failed")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify()
        self._thread.join(timeout=5)
