"""The dynamic batcher: concurrent submissions share model calls under the budget, each
future gets its own row, and a failing item fails alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from embedstream.batching import BatchBudget, DynamicBatcher


class Model:
    """Returns each item's value as a 1-d row; blocks its first call until released."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: list[int]) -> np.ndarray:
        self.calls.append(list(items))
        self.started.set()
        assert self.release.wait(10)
        if -1 in items:
            raise ValueError("bad item")
        return np.asarray(items, np.float32)[:, None]


def test_requests_queued_while_the_model_runs_share_one_batch_within_the_budget():
    model = Model()
    batcher = DynamicBatcher("m", model, BatchBudget(max_items=8, max_tokens=10_000, max_wait_s=0))
    first = batcher.submit([(0, 5)])
    assert model.started.wait(10)  # the model is busy with item 0
    rest = [batcher.submit([(i, 5)])[0] for i in range(1, 12)]  # eleven "requests" queue
    model.release.set()
    assert [f.result(10)[0] for f in [*first, *rest]] == list(range(12))
    assert model.calls[0] == [0]
    assert sorted(len(c) for c in model.calls[1:]) == [3, 8]  # max_items splits the 11
    batcher.close()


def test_token_budget_closes_batches():
    model = Model()
    model.release.set()
    batcher = DynamicBatcher("m", model, BatchBudget(max_items=64, max_tokens=20, max_wait_s=0))
    model.release.clear()
    first = batcher.submit([(0, 10)])
    assert model.started.wait(10)
    futures = batcher.submit([(i, 10) for i in range(1, 5)])
    model.release.set()
    assert [f.result(10)[0] for f in [*first, *futures]] == [0, 1, 2, 3, 4]
    assert all(len(c) * 10 <= 20 for c in model.calls)
    batcher.close()


def test_a_failing_item_fails_alone():
    model = Model()
    model.release.set()
    batcher = DynamicBatcher("m", model, BatchBudget(max_items=8, max_tokens=1000, max_wait_s=0))
    futures = batcher.submit([(1, 1), (-1, 1), (3, 1)])
    assert futures[0].result(10)[0] == 1 and futures[2].result(10)[0] == 3
    with pytest.raises(ValueError, match="bad item"):
        futures[1].result(10)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit([(1, 1)])
