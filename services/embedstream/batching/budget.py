"""Micro-batches packed by explicit budgets: items, padded tokens and wait time.

A batch is closed when one more item would exceed ``max_items`` or the padded
token count (items x longest, what the model actually computes), or would
make the padding waste exceed ``max_padding`` (padded / real tokens), or when
its oldest item has waited ``max_wait_s``. Items added together are sorted by
length first, so neighbours have similar lengths and padding stays small; the
padding limit keeps it small under light load too, when a poll brings a few
items of any length (one 250-token passage would otherwise pad ten 10-token
queries to 250).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BatchBudget:
    max_items: int
    max_tokens: int
    max_wait_s: float
    max_padding: float = 0.0
    """Most padded / real tokens in one batch; 0: no limit."""

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_tokens < 1 or self.max_wait_s < 0 or (
            self.max_padding and self.max_padding < 1
        ):
            raise ValueError(f"invalid batch budget {self}")


@dataclass(slots=True)
class Batch(Generic[T]):
    items: list[T] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    opened_at: float = 0.0

    @property
    def padded_tokens(self) -> int:
        return len(self.items) * max(self.lengths, default=0)

    def __len__(self) -> int:
        return len(self.items)


class Batcher(Generic[T]):
    """Accumulates items into batches under a :class:`BatchBudget`. Not thread-safe."""

    def __init__(self, budget: BatchBudget, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self._clock = clock
        self._open: Batch[T] = Batch()

    def __len__(self) -> int:
        return len(self._open)

    def add_many(self, items: Iterable[tuple[T, int]]) -> list[Batch[T]]:
        """Add (item, length) pairs, shortest first; return the batches they closed."""
        closed: list[Batch[T]] = []
        for item, length in sorted(items, key=lambda pair: pair[1]):
            closed.extend(self.add(item, length))
        return closed

    def add(self, item: T, length: int) -> list[Batch[T]]:
        """Add one item; return the batch it closed, if any (at most one)."""
        closed: list[Batch[T]] = []
        if self._open.items and not self._fits([length]):
            closed.append(self._take())
        if not self._open.items:
            self._open.opened_at = self._clock()
        self._open.items.append(item)
        self._open.lengths.append(length)
        if len(self._open) >= self.budget.max_items:
            closed.append(self._take())
        return closed

    def add_group(self, items: list[tuple[T, int]]) -> list[Batch[T]]:
        """Add (item, length) pairs that must share one batch (the chunks of a document,
        written together); return the batches closed. The open batch closes first when
        the group does not fit beside it; a group over the budget alone is a batch of
        its own (the inference stage runs it in budget-sized pieces)."""
        if not items:
            return []
        closed: list[Batch[T]] = []
        lengths = [length for _, length in items]
        if self._open.items and not self._fits(lengths):
            closed.append(self._take())
        if not self._open.items:
            self._open.opened_at = self._clock()
        for item, length in items:
            self._open.items.append(item)
            self._open.lengths.append(length)
        if len(self._open) >= self.budget.max_items or not self._fits([]):
            closed.append(self._take())
        return closed

    def _fits(self, lengths: list[int]) -> bool:
        """Would the open batch stay within the budget with ``lengths`` added?"""
        batch = self._open
        all_lengths = [*batch.lengths, *lengths]
        count = len(all_lengths)
        longest = max(all_lengths, default=0)
        padded = count * longest
        if count > self.budget.max_items or padded > self.budget.max_tokens:
            return False
        limit = self.budget.max_padding
        return not (limit and count > 1 and padded > limit * sum(all_lengths))

    def deadline(self) -> float | None:
        """When the open batch is due (clock time), or None when it is empty."""
        if not self._open.items:
            return None
        return self._open.opened_at + self.budget.max_wait_s

    def due(self) -> list[Batch[T]]:
        """The open batch if its oldest item has waited long enough."""
        deadline = self.deadline()
        if deadline is not None and self._clock() >= deadline:
            return [self._take()]
        return []

    def flush(self) -> list[Batch[T]]:
        """Close the open batch now, whatever its fill."""
        return [self._take()] if self._open.items else []

    def _take(self) -> Batch[T]:
        batch, self._open = self._open, Batch()
        return batch
