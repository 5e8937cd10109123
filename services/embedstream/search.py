"""Nearest-neighbour search over stored embeddings.

Uses the model's vector index (FT.SEARCH KNN) where the server has one; on a
server without the search module it falls back to an exact scan of the
model's keys, which is fine for development-sized data. The query vector is
sent in the index's own vector type (FLOAT32 or FLOAT16, read from the server
and remembered for a minute), see :mod:`embedstream.sinks.index`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import redis
from redis.commands.search.query import Query

from embedstream.errors import SinkError
from embedstream.sinks.index import index_vector_type, stored_vector, vector_bytes
from embedstream.sinks.redis import has_search, index_name, result_key

# Not "id": redis-py's search Document uses that attribute for the key.
_RETURN_FIELDS = ("text", "path", "model", "modality", "created_at", "source")
_TYPE_TTL_S = 60.0
# (server, index name) -> (when read, the index's vector type). An index's type never
# changes (a new type is a new index), so this only saves a round trip per query.
_index_types: dict[tuple[str, str], tuple[float, str]] = {}


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    key: str
    score: float  # cosine similarity, 1.0 = same direction
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TagFilter:
    """``field`` equals one of ``values`` (a metadata field indexed as ``tag``)."""

    field: str
    values: tuple[str, ...]

    def query(self) -> str:
        return f"@{self.field}:{{{' | '.join(_escape_tag(v) for v in self.values)}}}"

    def matches(self, value: str | None) -> bool:
        return value is not None and value in self.values


@dataclass(frozen=True, slots=True)
class RangeFilter:
    """``low <= field <= high`` (``None``: unbounded; a metadata field indexed as ``numeric``)."""

    field: str
    low: float | None = None
    high: float | None = None
    low_exclusive: bool = False
    high_exclusive: bool = False

    def query(self) -> str:
        low = "-inf" if self.low is None else ("(" if self.low_exclusive else "") + repr(self.low)
        high = "+inf" if self.high is None else ("(" if self.high_exclusive else "") + repr(self.high)
        return f"@{self.field}:[{low} {high}]"

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


def filter_expression(filters: Sequence[Filter]) -> str:
    """The RediSearch pre-filter of a hybrid KNN query: ``(@lang:{en} @year:[2000 2020])``."""
    if not filters:
        return "*"
    return "(" + " ".join(f.query() for f in filters) + ")"


def search_vector(
    client: redis.Redis,
    prefix: str,
    model: str,
    vector: np.ndarray,
    k: int,
    filters: Sequence[Filter] = (),
    fields: Sequence[str] = (),
    ef_runtime: int | None = None,
) -> list[Hit]:
    """The ``k`` stored items of ``model`` nearest to ``vector``, best first.

    ``filters`` restrict the candidates (all must hold; their fields must be
    indexed, see :func:`embedstream.sinks.redis.metadata_schema`); ``fields``
    are hash fields to return besides text, model, modality, created_at, source.
    ``ef_runtime`` overrides the HNSW index's EF_RUNTIME for this query (HNSW only).
    """
    query = np.asarray(vector, dtype=np.float32)
    wanted = tuple(dict.fromkeys((*_RETURN_FIELDS, *fields)))
    try:
        if has_search(client):
            return _knn(client, prefix, model, query, k, filters, wanted, ef_runtime)
        return _scan(client, prefix, model, query, k, filters, wanted)
    except redis.RedisError as err:
        raise SinkError(f"search in Redis failed: {err}") from err


def _knn(
    client: redis.Redis, prefix: str, model: str, vector: np.ndarray, k: int,
    filters: Sequence[Filter], wanted: tuple[str, ...], ef_runtime: int | None,
) -> list[Hit]:
    index = index_name(prefix, model)
    ef = " EF_RUNTIME $ef" if ef_runtime is not None else ""
    query = (
        Query(f"{filter_expression(filters)}=>[KNN {k} @embedding $vec{ef} AS distance]")
        .sort_by("distance")
        .return_fields("distance", *wanted)
        .paging(0, k)
        .dialect(2)
    )
    params: dict[str, str | int | float | bytes] = {}
    if ef_runtime is not None:
        params["ef"] = ef_runtime
    try:
        params["vec"] = vector_bytes(vector, _vector_type(client, index))
        result = client.ft(index).search(query, query_params=params)
    except redis.ResponseError as err:
        if "blob size" not in str(err):
            raise
        # The index was re-created with another type since we looked: look again.
        _index_types.pop((_server(client), index), None)
        params["vec"] = vector_bytes(vector, _vector_type(client, index))
        result = client.ft(index).search(query, query_params=params)
    key_start = len(result_key(prefix, model, ""))
    hits = []
    for doc in result.docs:
        fields = {name: _text(getattr(doc, name, "")) for name in wanted}
        # The index's COSINE metric returns a distance: 1 - cosine similarity.
        score = 1.0 - float(_text(doc.distance))
        key = _text(doc.id)
        hits.append(Hit(id=key[key_start:], key=key, score=score, fields=fields))
    return hits


def _scan(
    client: redis.Redis, prefix: str, model: str, vec: np.ndarray, k: int,
    filters: Sequence[Filter], wanted: tuple[str, ...],
) -> list[Hit]:
    query = vec / (np.linalg.norm(vec) or 1.0)
    key_start = len(result_key(prefix, model, ""))
    scored: list[tuple[float, str, dict[str, str]]] = []
    for key in client.scan_iter(match=result_key(prefix, model, "*"), count=1000):
        raw: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
        try:
            stored = stored_vector(raw.get(b"embedding", b""), query.shape[0])
        except ValueError:  # another dimension, or no vector
            continue
        if not all(f.matches(_optional_text(raw.get(f.field.encode()))) for f in filters):
            continue
        score = float(stored @ query / (np.linalg.norm(stored) or 1.0))
        fields = {name: _text(raw.get(name.encode(), b"")) for name in wanted}
        scored.append((score, _text(key), fields))
    scored.sort(key=lambda hit: hit[0], reverse=True)
    return [Hit(id=key[key_start:], key=key, score=s, fields=f) for s, key, f in scored[:k]]


def _vector_type(client: redis.Redis, name: str) -> str:
    """The vector type of index ``name`` (cached for a minute)."""
    key = (_server(client), name)
    now = time.monotonic()
    cached = _index_types.get(key)
    if cached is not None and now - cached[0] < _TYPE_TTL_S:
        return cached[1]
    kind = index_vector_type(client, name)
    _index_types[key] = (now, kind)
    return kind


def _server(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db')}{kwargs.get('path', '')}"


_TAG_SPECIAL = re.compile(r"([^A-Za-z0-9_])")


def _escape_tag(value: str) -> str:
    """Escape a tag value for a query: every character but letters, digits and _."""
    return _TAG_SPECIAL.sub(r"\\\1", value)


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
