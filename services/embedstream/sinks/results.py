"""The results stream: "embedding ready" records for event-driven applications.

After a batch is stored in Redis (or its deletions applied), and before its
offsets may be committed, the worker publishes one record per event to
``settings.topic_results``. Key: the event id. Value (UTF-8 JSON)::

    {"id": "doc-42", "model": "all-minilm-l6-v2", "modality": "text", "dim": 384,
     "key": "embedstream:all-minilm-l6-v2:doc-42", "chunks": 1, "stored_at": 1767000000.1,
     "source": "embedstream.text:3:1207", "vector": [0.01, ...]}

``vector`` (chunk 0's) and ``vectors`` (every chunk's) only with
``results_include_vector``. A deletion is ``{"id", "model", "modality", "deleted":
true, "version", "source", "stored_at"}``. Both carry ``tenant`` when the event has one. Contract: a record is
published only for an event already stored (so "ready" is never announced
early); with ``results_cloudevents`` the records are CloudEvents (binary or
structured mode); the announcement is at-least-once, like the pipeline: a worker that
crashes after the write but before the commit stores and announces again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from embedstream import cloudevent
from embedstream.errors import SinkError, SourceError
from embedstream.sections import KafkaSettings
from embedstream.sinks.base import Deletion, Embedded
from embedstream.sinks.layout import result_key

log = logging.getLogger(__name__)


class ResultsPublisher(Protocol):
    def publish(self, results: Sequence[Embedded | Deletion]) -> None:
        """Announce a stored batch; return once the broker confirmed it, or raise
        :class:`~embedstream.errors.SinkError` (the caller retries)."""
        ...

    def close(self) -> None: ...


def result_record(
    result: Embedded, prefix: str, stored_at: float, include_vector: bool,
    tagged: bool = False,
) -> dict[str, Any]:
    """The JSON body of one results record."""
    event = result.event
    record = event.record
    body: dict[str, Any] = {
        "id": event.id,
        "model": result.model.name,
        "modality": result.model.modality,
        "dim": result.model.dimension,
        "key": result_key(prefix, result.model.name, event.id, tenant=event.tenant,
                          tagged=tagged),
        "chunks": len(result.parts()),
        "stored_at": stored_at,
        "source": f"{record.topic}:{record.partition}:{record.offset}",
    }
    if event.tenant is not None:
        body["tenant"] = event.tenant
    if include_vector:
        vectors = [[float(x) for x in chunk.vector] for chunk in result.parts()]
        body["vector"] = vectors[0]
        if len(vectors) > 1:
            body["vectors"] = vectors
    return body


def deletion_record(deletion: Deletion, stored_at: float) -> dict[str, Any]:
    """The JSON body of one deletion's results record."""
    event = deletion.event
    record = event.record
    body: dict[str, Any] = {
        "id": event.id,
        "model": deletion.model.name,
        "modality": deletion.model.modality,
        "deleted": True,
        "version": event.version,
        "stored_at": stored_at,
        "source": f"{record.topic}:{record.partition}:{record.offset}",
    }
    if event.tenant is not None:
        body["tenant"] = event.tenant
    return body


class KafkaResultsPublisher:
    """Publishes results records with the package's :class:`~embedstream.producer.Producer`."""

    def __init__(self, settings: KafkaSettings, key_prefix: str, tagged: bool = False) -> None:
        from embedstream.producer import Producer

        self._settings = settings
        self._key_prefix = key_prefix  # of the stored documents' keys (results name them)
        self._tagged = tagged  # keys of a cluster (see embedstream.sinks.layout)
        self._producer = Producer(settings, topics=[settings.topic_results])

    def publish(self, results: Sequence[Embedded | Deletion]) -> None:
        now = time.time()
        settings = self._settings
        records: list[tuple[str | None, bytes | None]] = []
        headers: list[list[tuple[str, bytes]]] = []
        for r in results:
            body = (deletion_record(r, now) if isinstance(r, Deletion) else
                    result_record(r, self._key_prefix, now, settings.results_include_vector,
                                  self._tagged))
            value, extra = _encode(body, settings.results_cloudevents)
            records.append((r.event.id, value))
            headers.append(extra)
        try:
            self._producer.publish(settings.topic_results, records, timeout_s=30.0,
                                   headers=headers)
        except SourceError as err:
            raise SinkError(f"results of {len(results)} events not published: {err}") from err

    def close(self) -> None:
        self._producer.close()


def _encode(body: dict[str, Any], cloudevents: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A results record's value and headers: plain JSON, or a CloudEvent in ``cloudevents``
    mode (see :mod:`embedstream.cloudevent`)."""
    if cloudevents == "structured":
        return cloudevent.structured_value(body)
    value = json.dumps(body, separators=(",", ":")).encode("utf-8")
    return value, cloudevent.binary_headers(body) if cloudevents == "binary" else []
