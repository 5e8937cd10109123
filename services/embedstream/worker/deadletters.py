"""The worker's side of the dead-letter topic: reject a record, keep retrying until written.

Any stage (and the polling thread) rejects a record through
:meth:`DeadLetterer.reject`; it returns at once. The record stays in flight,
uncommitted, until its dead letter is acknowledged; then it is done. A letter
that fails (the broker away) is sent again after a jittered backoff by one
retry thread; at shutdown pending retries are dropped and those records stay
uncommitted, so the next owner rejects them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from embedstream.envelope import RawRecord
from embedstream.metrics import Metrics
from embedstream.retry import Backoff, RetryScheduler
from embedstream.sources.base import DeadLetters
from embedstream.worker.items import Position, position

log = logging.getLogger(__name__)

_BACKOFF = Backoff(initial_s=0.5, max_s=8.0)
_DETAIL_CHARS = 1000  # a detail quotes the input at times: bound what logs and headers carry


def describe(err: BaseException) -> str:
    """An unforeseen exception as the ``embedstream.error`` detail: type and message."""
    return f"{type(err).__name__}: {err}"


class DeadLetterer:
    """Sends rejected records to the dead-letter topic. Thread-safe."""

    def __init__(
        self,
        transport: DeadLetters,
        metrics: Metrics,
        on_done: Callable[[list[Position]], None],
        backoff: Backoff = _BACKOFF,
    ) -> None:
        self._transport = transport
        self._metrics = metrics
        self._on_done = on_done
        self._backoff = backoff
        self._retries = RetryScheduler("embedstream-dlq-retry")
        self.ok = True
        """False while the last attempt failed (readiness)."""

    def reject(self, record: RawRecord, reason: str, detail: str) -> None:
        """Dead-letter ``record`` with ``reason``; it is done once the letter is written."""
        detail = detail if len(detail) <= _DETAIL_CHARS else detail[:_DETAIL_CHARS] + "..."
        log.info("rejecting %s:%d@%d: %s (%s)", *position(record), reason, detail)
        self._send(record, reason, detail, 0)

    def _send(self, record: RawRecord, reason: str, detail: str, attempt: int) -> None:
        pos = position(record)

        def on_done() -> None:
            self.ok = True
            self._metrics.failed.labels(reason).inc()
            self._on_done([pos])

        def on_error(err: Exception) -> None:
            # The event stays uncommitted (in flight) until its dead letter is written.
            self.ok = False
            delay = self._backoff.delay(attempt)
            log.warning("dead letter for %s not written (%s); retrying in %.1fs", pos, err, delay)
            self._retries.schedule(delay, lambda: self._send(record, reason, detail, attempt + 1))

        try:
            self._transport.send(record, reason, detail, on_done, on_error)
        except Exception as err:  # the transport broke its contract; retry all the same
            on_error(err)

    def pending_retries(self) -> int:
        return self._retries.pending()

    def flush(self, timeout_s: float) -> None:
        self._transport.flush(timeout_s)

    def close(self) -> None:
        """Drop pending retries (their records stay uncommitted) and close the producer."""
        self._retries.close()
        self._transport.close()
