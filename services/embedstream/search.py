"""Nearest-neighbour search over stored embeddings: documents, or every chunk.

Uses the model's vector index (FT.SEARCH KNN) where the server has one; on a
server without the search module it falls back to an exact scan of the
model's keys, which is fine for development-sized data. By default a search
returns documents: the best chunk of each, k distinct documents (it asks the
index for more chunks until it has them); ``per_document=False`` returns
every chunk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from redis.commands.search.query import Query

from embedstream.errors import SinkError
from embedstream.sinks.layout import (
    TENANT_FIELD,
    id_of_segment,
    index_name,
    meta_field,
    metadata_of,
    result_key,
)
from embedstream.sinks.redis import has_search

# System fields a hit carries (see embedstream.sinks.layout). The document id is read
# as doc_id: redis-py's search Document keeps the key in its "id" attribute.
_RETURN_FIELDS = ("text", "model", "modality", "created_at", "source", "chunk", "chunks",
                  "start", "end", "metadata", "tenant")
_FETCH_GROWTH = 4
_FETCH_MAX = 10_000


class IndexMoved(SinkError):
    """The model's index answered with another model's vectors: a rollout was promoted
    between embedding the query and searching (the public index name is an alias of the
    new model's index now). Embed the query again with the model serving the name."""


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    """The document id."""
    key: str
    """The key of the hit's chunk."""
    score: float  # cosine similarity, 1.0 = same direction
    fields: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    """The document's metadata as its producer sent it."""

    @property
    def chunk(self) -> int:
        return int(self.fields.get("chunk") or 0)

    @property
    def chunks(self) -> int:
        return int(self.fields.get("chunks") or 1)

    @property
    def span(self) -> tuple[int, int] | None:
        """The chunk's character offsets in the document's text (None: not text)."""
        start, end = self.fields.get("start"), self.fields.get("end")
        return (int(start), int(end)) if start and end else None


@dataclass(frozen=True, slots=True)
class TagFilter:
    """Metadata field ``field`` equals one of ``values`` (indexed as ``tag``)."""

    field: str
    values: tuple[str, ...]

    def query(self) -> str:
        escaped = " | ".join(_escape_tag(v) for v in self.values)
        return f"@{meta_field(self.field)}:{{{escaped}}}"

    def matches(self, value: str | None) -> bool:
        return value is not None and value in self.values


@dataclass(frozen=True, slots=True)
class RangeFilter:
    """``low <= field <= high`` (``None``: unbounded) on a metadata field indexed as
    ``numeric``."""

    field: str
    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False
    high_exclusive: bool = False

    def query(self) -> str:
        low = "-inf" if self.low is None else ("(" if self.low_exclusive else "") + repr(self.low)
        high = "+inf" if self.high is None else ("(" if self.high_exclusive else "") + repr(self.high)
        return f"@{meta_field(self.field)}:[{low} {high}]"

    def matches(self, value: str | None) -> bool:
        try:
            number = float(value) if value is not None else math.nan
        except ValueError:
            return False
        if math.isnan(number):
            return False
        if self.low is not None and (number < self.low or (self.low_exclusive and number == self.low)):
            return False
        return not (
            self.high is not None
            and (number > self.high or (self.high_exclusive and number == self.high))
        )


Filter = TagFilter | RangeFilter


def filter_expression(filters: Sequence[Filter], tenant: str | None = None) -> str:
    """The RediSearch pre-filter of a hybrid KNN query:
    ``(@tenant:{acme} @meta_lang:{en} @meta_year:[2000 2020])``.

    Every tag value is escaped, so no filter value can end its clause early:
    the tenant's clause always holds.
    """
    clauses = [f.query() for f in filters]
    if tenant is not None:
        clauses.insert(0, f"@{TENANT_FIELD}:{{{_escape_tag(tenant)}}}")
    if not clauses:
        return "*"
    return "(" + " ".join(clauses) + ")"


def search_vector(
    client: redis.Redis,
    prefix: str,
    model: str,
    vector: np.ndarray,
    k: int,
    filters: Sequence[Filter] = (),
    fields: Sequence[str] = (),
    per_document: bool = True,
    tenant: str | None = None,
) -> list[Hit]:
    """The ``k`` stored documents of ``model`` nearest to ``vector``, best first (each
    its best chunk); with ``per_document=False``, the ``k`` nearest chunks.

    ``filters`` restrict the candidates (all must hold; their fields must be
    indexed, see :func:`embedstream.sinks.redis.metadata_schema`); ``fields``
    are hash fields to return besides the system fields. ``tenant``: only that
    tenant's documents (None: every document, whatever its tenant).
    """
    query_vec = np.asarray(vector, dtype="<f4").tobytes()
    wanted = tuple(dict.fromkeys((*_RETURN_FIELDS, *fields)))
    try:
        if has_search(client):
            fetch = k * _FETCH_GROWTH if per_document else k
            while True:
                chunks = _knn(client, prefix, model, query_vec, fetch, filters, wanted, tenant)
                moved = {h.fields.get("model", "") for h in chunks} - {model, ""}
                if moved:  # never answer with vectors of two spaces
                    raise IndexMoved(f"the index of {model} holds {sorted(moved)}'s vectors now")
                hits = best_per_document(chunks) if per_document else chunks
                if len(hits) >= k or len(chunks) < fetch or fetch >= _FETCH_MAX:
                    return hits[:k]
                fetch = min(_FETCH_MAX, fetch * _FETCH_GROWTH)
        chunks = _scan(client, prefix, model, np.frombuffer(query_vec, "<f4"), filters, wanted,
                       tenant)
        return (best_per_document(chunks) if per_document else chunks)[:k]
    except redis.RedisError as err:
        raise SinkError(f"search in Redis failed: {err}") from err


def best_per_document(hits: Sequence[Hit]) -> list[Hit]:
    """Hits sorted best first, one per document (its best chunk). A document is its
    tenant and id: two tenants' documents with one id are two documents."""
    seen: set[tuple[str, str]] = set()
    out: list[Hit] = []
    for hit in sorted(hits, key=lambda h: h.score, reverse=True):
        document = (hit.fields.get(TENANT_FIELD) or "", hit.id)
        if document not in seen:
            seen.add(document)
            out.append(hit)
    return out


def _knn(
    client: redis.Redis, prefix: str, model: str, vec: bytes, k: int,
    filters: Sequence[Filter], wanted: tuple[str, ...], tenant: str | None,
) -> list[Hit]:
    query = (
        Query(f"{filter_expression(filters, tenant)}=>[KNN {k} @embedding $vec AS distance]")
        .sort_by("distance")
        .return_fields("distance", *wanted)
        .return_field("id", as_field="doc_id")
        .paging(0, k)
        .dialect(2)
    )
    result = client.ft(index_name(prefix, model)).search(query, query_params={"vec": vec})
    hits = []
    for doc in result.docs:
        fields = {name: _text(getattr(doc, name, "")) for name in wanted}
        # The index's COSINE metric returns a distance: 1 - cosine similarity.
        score = 1.0 - float(_text(doc.distance))
        key = _text(doc.id)
        doc_id = _text(getattr(doc, "doc_id", "")) or _id_from_key(prefix, model, key)
        hits.append(_hit(doc_id, key, score, fields))
    return hits


def _scan(
    client: redis.Redis, prefix: str, model: str, vec: np.ndarray,
    filters: Sequence[Filter], wanted: tuple[str, ...], tenant: str | None,
) -> list[Hit]:
    query = vec / (np.linalg.norm(vec) or 1.0)
    scored: list[Hit] = []
    for key in client.scan_iter(match=result_key(prefix, model, "*"), count=1000):
        raw: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
        if tenant is not None and raw.get(TENANT_FIELD.encode()) != tenant.encode():
            continue
        stored = np.frombuffer(raw.get(b"embedding", b""), dtype="<f4")
        if stored.shape != query.shape:
            continue
        if not all(f.matches(_optional_text(raw.get(meta_field(f.field).encode())))
                   for f in filters):
            continue
        score = float(stored @ query / (np.linalg.norm(stored) or 1.0))
        fields = {name: _text(raw.get(name.encode(), b"")) for name in wanted}
        doc_id = _text(raw.get(b"id", b"")) or _id_from_key(prefix, model, _text(key))
        scored.append(_hit(doc_id, _text(key), score, fields))
    scored.sort(key=lambda hit: hit.score, reverse=True)
    return scored


def _hit(doc_id: str, key: str, score: float, fields: dict[str, str]) -> Hit:
    metadata = metadata_of(fields)
    shown = {name: value for name, value in fields.items()
             if name != "metadata" and (value or name != TENANT_FIELD)}  # untenanted: no field
    return Hit(id=doc_id, key=key, score=score, fields=shown, metadata=metadata)


def _id_from_key(prefix: str, model: str, key: str) -> str:
    """A document id from a chunk's key (for hashes without an ``id`` field)."""
    return id_of_segment(key[len(result_key(prefix, model, "")):].split("#", 1)[0])


_TAG_SPECIAL = re.compile(r"([^A-Za-z0-9_])")


def _escape_tag(value: str) -> str:
    """Escape a tag value for a query: every character but letters, digits and _."""
    return _TAG_SPECIAL.sub(r"\\\1", value)


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
