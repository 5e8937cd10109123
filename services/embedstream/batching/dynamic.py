"""Dynamic batching across concurrent callers: one model thread, many requests.

Request handlers :meth:`DynamicBatcher.submit` prepared items (tokenized texts,
decoded images) and get one :class:`~concurrent.futures.Future` per item. One
thread per model takes everything queued, packs it into batches under the
same :class:`~embedstream.batching.BatchBudget` as the worker (items, padded
tokens, padding waste), runs them, and resolves the futures. No wait is added:
a batch is whatever queued while the model was busy with the previous one, so
under light load a request runs at once, and N concurrent requests cost about
one batch, not N model calls.

Errors are data: a batch whose run raises is run again item by item, so only
the item that fails gets the exception; the others get their vectors.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from embedstream.batching.budget import BatchBudget, Batcher

log = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()


@dataclass(frozen=True, slots=True)
class _Pending(Generic[T]):
    item: T
    future: Future[np.ndarray]


class DynamicBatcher(Generic[T]):
    """Batches items from any thread into calls of ``run(items) -> [n, dim]``.

    Contract: every submitted item's future is resolved exactly once, with its
    row of ``run``'s output or with the exception its own run raised; after
    :meth:`close`, submitting raises ``RuntimeError`` and queued items fail.
    ``on_batch`` (optional) hears each batch's size, for metrics.
    """

    def __init__(self, name: str, run: Callable[[list[T]], np.ndarray], budget: BatchBudget,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.name = name
        self.budget = budget
        self._run = run
        self._on_batch = on_batch
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[tuple[T, int]]) -> list[Future[np.ndarray]]:
        """Queue (item, cost) pairs; one future per item, in order."""
        futures: list[Future[np.ndarray]] = []
        with self._lock:
            if self._closed:
                raise RuntimeError(f"batcher {self.name} is closed")
            for item, cost in items:
                future: Future[np.ndarray] = Future()
                self._queue.put((_Pending(item, future), cost))
                futures.append(future)
        return futures

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish what is queued, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        batcher: Batcher[_Pending[T]] = Batcher(self.budget)
        while True:
            first = self._queue.get()
            stop = first is _STOP
            closed = [] if stop else batcher.add(*first)
            # Everything queued now joins; the model was busy while it queued.
            while not stop:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                closed += batcher.add(*more)
            for batch in [*closed, *batcher.flush()]:
                self._execute(batch.items)
            if stop:
                return

    def _execute(self, pending: list[_Pending[T]]) -> None:
        if self._on_batch is not None:
            self._on_batch(len(pending))
        try:
            vectors = self._run([p.item for p in pending])
            if len(vectors) != len(pending):
                raise RuntimeError(f"the model returned {len(vectors)} rows for {len(pending)} items")
        except Exception as err:
            if len(pending) == 1:
                pending[0].future.set_exception(err)
                return
            log.warning("%s: a batch of %d failed (%s); running its items one by one",
                        self.name, len(pending), err)
            for one in pending:
                self._execute([one])
            return
        for row, p in enumerate(pending):
            p.future.set_result(vectors[row])
