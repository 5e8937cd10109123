"""What travels between the worker's stages, and the queue helpers they share."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedstream.envelope import Event, RawRecord
from embedstream.preprocess.base import Prepared
from embedstream.runtime.loader import LoadedModel
from embedstream.sinks.base import Deletion

STOP = object()
"""End-of-stream marker passed down the stage queues at shutdown."""

Position = tuple[str, int, int]
"""(topic, partition, offset) of a record: what the committer tracks."""


def position(record: RawRecord) -> Position:
    return (record.topic, record.partition, record.offset)


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """Which window of its document an item is: index, count, character offsets."""

    index: int
    count: int
    start: int
    end: int


@dataclass(slots=True)
class Item:
    """An event (or one chunk of it) with its model input, waiting for or inside a batch.
    The chunks of one document always travel in one batch."""

    event: Event
    prepared: Prepared
    chunk: ChunkSpan | None = None


@dataclass(slots=True)
class WorkBatch:
    """A batch for the inference stage: items of one model."""

    model: LoadedModel
    items: list[Item]
    padded_tokens: int


@dataclass(slots=True)
class ResultBatch:
    """A batch for the sink stage: the items the model embedded, with their vectors."""

    model: LoadedModel
    items: list[Item]
    vectors: np.ndarray
    tokens: list[np.ndarray] | None = None


@dataclass(slots=True)
class DeleteBatch:
    """Deletions for the sink stage, straight from the pre stage (no model to run)."""

    deletions: list[Deletion]


def put(q: queue.Queue[Any], item: Any, abandon: threading.Event) -> bool:
    """Blocking put that gives up (False) when the worker abandons its work."""
    while not abandon.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
