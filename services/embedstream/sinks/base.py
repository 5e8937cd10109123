"""The sink interface: where embeddings are stored.

Contract: :meth:`Sink.write` stores every item of a batch except those it
returns as :attr:`WriteOutcome.rejected` (refused for the item's own data:
the worker dead-letters them as ``store_rejected``), or raises
:class:`~embedstream.errors.SinkError` when the store itself failed
(:class:`~embedstream.errors.StoreFull` when it is out of memory); then any
part of the batch may be stored, and the worker retries the whole batch. It
never reports an item stored that is not. The worker commits offsets only
after ``write`` returned, so a write is the decision to commit. Delivery is
at-least-once and writes are idempotent per (model, id, version, record
position): a redelivered event is recognised as a duplicate, and an older
version never overwrites a newer one; equal versions are ordered by offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from embedstream.envelope import Event
from embedstream.models.manifest import Manifest


@dataclass(frozen=True, slots=True)
class Embedded:
    """One event's result."""

    event: Event
    model: Manifest
    vector: np.ndarray
    tokens: np.ndarray | None = None
    """Token-mode models: ``[tokens, dimension]`` contextual token vectors."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """An item the store refused for its own data: ``index`` in the written batch."""

    index: int
    detail: str
    reason: str = "store_rejected"


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What a write did with each result of a batch."""

    stored: int = 0  # new, or a newer version than the one stored
    duplicates: int = 0  # this version was already stored (a redelivery)
    stale: int = 0  # a newer version is stored; left as it was
    rejected: tuple[Rejected, ...] = ()  # refused for their data; not stored


class Sink(Protocol):
    def prepare(self, models: list[Manifest]) -> None:
        """Create per-model structures (vector indexes). Called once at start."""
        ...

    def write(self, results: list[Embedded]) -> WriteOutcome: ...

    def ping(self) -> bool:
        """True when the store answers; used by readiness."""
        ...

    def close(self) -> None: ...
