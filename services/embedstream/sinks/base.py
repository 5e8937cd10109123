"""The sink interface: where embeddings are stored.

Contract: :meth:`Sink.write` stores a whole batch or raises
:class:`~embedstream.errors.SinkError`; it never stores part of a batch and
reports success. The worker commits offsets only after ``write`` returned,
so a write is the decision to commit. Delivery is at-least-once and writes
are idempotent per (model, id, version): a redelivered event is recognised
as a duplicate, and an older version never overwrites a newer one.
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
class WriteOutcome:
    """What a write did with each result of a batch."""

    stored: int = 0  # new, or a newer version than the one stored
    duplicates: int = 0  # this version was already stored (a redelivery)
    stale: int = 0  # a newer version is stored; left as it was


class Sink(Protocol):
    def prepare(self, models: list[Manifest]) -> None:
        """Create per-model structures (vector indexes). Called once at start."""
        ...

    def write(self, results: list[Embedded]) -> WriteOutcome: ...

    def ping(self) -> bool:
        """True when the store answers; used by readiness."""
        ...

    def close(self) -> None: ...
