"""The sink interface: where embeddings are stored, and deleted.

A document is the unit: one event's result, with one vector per chunk (a text
over its model's token limit is split into chunks; everything else is one).
All chunks of a document are written together, replacing every chunk of an
older version, and deleted together.

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
class Chunk:
    """One window of a document and its vector."""

    index: int
    start: int
    """Character offsets of the window in the event's text (0, len(text) when whole)."""
    end: int
    vector: np.ndarray
    tokens: np.ndarray | None = None
    """Token-mode models: ``[tokens, dimension]`` contextual token vectors."""


@dataclass(frozen=True, slots=True)
class Embedded:
    """One event's result: its document's chunks, in order (one for most events)."""

    event: Event
    model: Manifest
    vector: np.ndarray | None = None
    """The one vector of a document that is not chunked (then ``chunks`` is empty)."""
    tokens: np.ndarray | None = None
    chunks: tuple[Chunk, ...] = ()

    def parts(self) -> tuple[Chunk, ...]:
        """Every chunk of the document (a single whole chunk when not chunked)."""
        if self.chunks:
            return self.chunks
        assert self.vector is not None, "an Embedded needs a vector or chunks"
        return (Chunk(0, 0, len(self.event.text or ""), self.vector, self.tokens),)


@dataclass(frozen=True, slots=True)
class Deletion:
    """Delete every chunk of ``event.id`` under ``model`` (a tombstone or ``op: delete``)."""

    event: Event
    model: Manifest


@dataclass(frozen=True, slots=True)
class DeleteOutcome:
    deleted: int = 0  # a document was there and is gone
    absent: int = 0  # nothing was there; the delete's marker is kept all the same
    stale: int = 0  # a newer version is stored; left as it was
    duplicates: int = 0  # this delete was applied already (a redelivery)


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
    rejected: tuple[Rejected, ...] = ()  # refused for their data; not stored
    # The indexes of the stale ones: a newer version (or delete) is stored, so each was
    # left as it was, and is never announced as stored.
    stale_at: tuple[int, ...] = ()

    @property
    def stale(self) -> int:
        return len(self.stale_at)


class Sink(Protocol):
    def prepare(self, models: list[Manifest]) -> None:
        """Create per-model structures (vector indexes). Called once at start."""
        ...

    def write(self, results: list[Embedded]) -> WriteOutcome: ...

    def delete(self, deletions: list[Deletion]) -> DeleteOutcome:
        """Delete documents, versioned like writes: an older delete leaves a newer
        document alone, and a delete leaves a marker (for ``tombstone_retention_s``) so a
        replayed older write cannot bring the document back. Raises like ``write``."""
        ...

    def ping(self) -> bool:
        """True when the store answers; used by readiness."""
        ...

    def close(self) -> None: ...
