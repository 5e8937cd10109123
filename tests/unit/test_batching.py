import pytest

from embedstream.batching import BatchBudget, Batcher


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_closes_at_max_items():
    batcher = Batcher(BatchBudget(max_items=3, max_tokens=10_000, max_wait_s=1), Clock())
    closed = batcher.add_many([(i, 5) for i in range(7)])
    assert [len(b) for b in closed] == [3, 3]
    assert len(batcher) == 1


def test_padded_token_budget_counts_items_times_longest():
    batcher = Batcher(BatchBudget(max_items=100, max_tokens=100, max_wait_s=1), Clock())
    assert batcher.add("a", 10) == []
    assert batcher.add("b", 40) == []  # 2 x 40 = 80
    closed = batcher.add("c", 40)  # 3 x 40 = 120 > 100: close a, b first
    assert [b.items for b in closed] == [["a", "b"]]
    assert closed[0].padded_tokens == 80


def test_one_oversized_item_still_forms_a_batch():
    batcher = Batcher(BatchBudget(max_items=4, max_tokens=10, max_wait_s=1), Clock())
    batcher.add("big", 50)
    assert [b.items for b in batcher.flush()] == [["big"]]


def test_add_many_sorts_by_length_to_reduce_padding():
    batcher = Batcher(BatchBudget(max_items=2, max_tokens=10_000, max_wait_s=1), Clock())
    closed = batcher.add_many([("long1", 90), ("short1", 3), ("long2", 95), ("short2", 4)])
    assert [b.items for b in closed] == [["short1", "short2"], ["long1", "long2"]]
    assert sum(b.padded_tokens for b in closed) == 2 * 4 + 2 * 95


def test_wait_deadline():
    clock = Clock()
    batcher = Batcher(BatchBudget(max_items=10, max_tokens=10_000, max_wait_s=0.5), clock)
    assert batcher.deadline() is None
    batcher.add("a", 1)
    assert batcher.deadline() == 0.5
    clock.now = 0.4
    assert batcher.due() == []
    clock.now = 0.5
    assert [b.items for b in batcher.due()] == [["a"]]
    assert batcher.deadline() is None


def test_invalid_budget_is_refused():
    with pytest.raises(ValueError):
        BatchBudget(max_items=0, max_tokens=1, max_wait_s=0)


def test_padding_limit_keeps_short_items_apart_from_long_ones():
    budget = BatchBudget(max_items=32, max_tokens=10_000, max_wait_s=1, max_padding=1.5)
    batcher = Batcher(budget, Clock())
    closed = batcher.add_many([("q1", 10), ("p1", 250), ("q2", 12), ("q3", 9)])
    assert [b.items for b in closed] == [["q3", "q1", "q2"]]
    assert batcher.flush()[0].items == ["p1"]
    with pytest.raises(ValueError):
        BatchBudget(max_items=1, max_tokens=1, max_wait_s=0, max_padding=0.5)
