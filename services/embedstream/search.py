"""Nearest-neighbour search over stored embeddings: documents, or every chunk.

Uses the model's vector index (FT.SEARCH KNN) where the server has one; on a
server without the search module it falls back to an exact scan of the
model's keys, which is fine for development-sized data. By default a search
returns documents: the best chunk of each, k distinct documents (it asks the
index for more chunks until it has them); ``per_document=False`` returns
every chunk. The query vector is sent in the index's own vector type (FLOAT32
or FLOAT16, read from the server and remembered for a minute), see
:mod:`embedstream.sinks.index`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import redis
from redis.commands.search.query import Query
from redis.exceptions import RedisClusterException

from embedstream.errors import SinkError
from embedstream.sinks.cluster import Client, SearchMode, index_targets, is_cluster, search_mode
from embedstream.sinks.index import index_vector_type, stored_vector, vector_bytes
from embedstream.sinks.layout import (
    TENANT_FIELD,
    id_of_segment,
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
_TYPE_TTL_S = 60.0
K = TypeVar("K")
V = TypeVar("V")
# (server, index name) -> (when read, the index's vector type). An index's type never
# changes (a new type is a new index), so this only saves a round trip per query.
_index_types: dict[tuple[str, str], tuple[float, str]] = {}
_search_modes: dict[tuple[int, str], tuple[float, SearchMode]] = {}


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
    client: Client,
    prefix: str,
    model: str,
    vector: np.ndarray,
    k: int,
    filters: Sequence[Filter] = (),
    fields: Sequence[str] = (),
    per_document: bool = True,
    tenant: str | None = None,
    ef_runtime: int | None = None,
    cluster_search: str = "auto",
) -> list[Hit]:
    """The ``k`` stored documents of ``model`` nearest to ``vector``, best first (each
    its best chunk); with ``per_document=False``, the ``k`` nearest chunks.

    ``filters`` restrict the candidates (all must hold; their fields must be
    indexed, see :func:`embedstream.sinks.redis.metadata_schema`); ``fields``
    are hash fields to return besides the system fields. ``tenant``: only that
    tenant's documents (None: every document, whatever its tenant). ``ef_runtime``
    overrides the HNSW index's EF_RUNTIME for this query (HNSW only). On a Redis
    Cluster without the query engine's coordinator every master is asked and their top
    k merged (see :mod:`embedstream.sinks.cluster`); ``cluster_search`` is
    ``settings.redis_cluster_search``.
    """
    query = np.asarray(vector, dtype=np.float32)
    wanted = tuple(dict.fromkeys((*_RETURN_FIELDS, *fields)))
    try:
        if has_search(client):
            targets = index_targets(client, prefix, model, _search_mode(client, cluster_search))
            fetch = k * _FETCH_GROWTH if per_document else k
            while True:
                chunks = _merged(targets, prefix, model, query, fetch, filters, wanted,
                                 ef_runtime, tenant)
                moved = {h.fields.get("model", "") for h in chunks} - {model, ""}
                if moved:  # never answer with vectors of two spaces
                    raise IndexMoved(f"the index of {model} holds {sorted(moved)}'s vectors now")
                hits = best_per_document(chunks) if per_document else chunks
                if len(hits) >= k or len(chunks) < fetch or fetch >= _FETCH_MAX:
                    return hits[:k]
                fetch = min(_FETCH_MAX, fetch * _FETCH_GROWTH)
        chunks = _scan(client, prefix, model, query, filters, wanted, tenant)
        return (best_per_document(chunks) if per_document else chunks)[:k]
    except (redis.RedisError, RedisClusterException) as err:
        raise SinkError(f"search in Redis failed: {err}") from err


def _merged(
    targets: list[tuple[redis.Redis, str]], prefix: str, model: str, vector: np.ndarray,
    k: int, filters: Sequence[Filter], wanted: tuple[str, ...], ef_runtime: int | None,
    tenant: str | None = None,
) -> list[Hit]:
    """The ``k`` nearest chunks over every index of ``targets`` (one per shard, or one)."""
    if len(targets) == 1:
        node, index = targets[0]
        return _knn(node, index, prefix, model, vector, k, filters, wanted, ef_runtime, tenant)
    # One index per master (no coordinator). The search module of a cluster node finds
    # the keys but returns none of their fields (not even the distance), so each shard's
    # nearest keys are read back from it and scored here, exactly.
    hits = [hit for node, index in targets
            for hit in _knn(node, index, prefix, model, vector, k, filters, wanted, ef_runtime,
                            tenant, load=True)]
    return sorted(hits, key=lambda hit: hit.score, reverse=True)[:k]


def _search_mode(client: Client, wanted: str) -> SearchMode:
    """The client's search mode, cached a minute (a cluster gains no coordinator at run
    time; this saves the question per query)."""
    if not is_cluster(client):
        return "single"
    return _cached(_search_modes, (id(client), wanted), lambda: search_mode(client, wanted))


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
    client: redis.Redis, index: str, prefix: str, model: str, vector: np.ndarray, k: int,
    filters: Sequence[Filter], wanted: tuple[str, ...], ef_runtime: int | None,
    tenant: str | None = None, load: bool = False,
) -> list[Hit]:
    """The ``k`` nearest chunks in ``index``; ``load``: the index gives only their keys,
    whose hashes are then read from ``client`` and scored here."""
    ef = " EF_RUNTIME $ef" if ef_runtime is not None else ""
    query = (
        Query(f"{filter_expression(filters, tenant)}=>[KNN {k} @embedding $vec{ef} AS distance]")
        .sort_by("distance")
        .paging(0, k)
        .dialect(2)
    )
    if load:
        query = query.no_content()
    else:
        query = query.return_fields("distance", *wanted).return_field("id", as_field="doc_id")
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
    if load:
        return _loaded(client, [_text(doc.id) for doc in result.docs], prefix, model, vector,
                       wanted)
    hits = []
    for doc in result.docs:
        fields = {name: _text(getattr(doc, name, "")) for name in wanted}
        # The index's COSINE metric returns a distance: 1 - cosine similarity.
        score = 1.0 - float(_text(doc.distance))
        key = _text(doc.id)
        doc_id = _text(getattr(doc, "doc_id", "")) or _id_from_key(prefix, model, key)
        hits.append(_hit(doc_id, key, score, fields))
    return hits


def _loaded(client: redis.Redis, keys: list[str], prefix: str, model: str, vec: np.ndarray,
            wanted: tuple[str, ...]) -> list[Hit]:
    """Hits of ``keys``, read from ``client`` in one round trip and scored exactly."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    query = vec / (np.linalg.norm(vec) or 1.0)
    hits = []
    for key, raw in zip(keys, pipe.execute(), strict=True):
        hit = _scored(prefix, model, key, raw, query, wanted) if raw else None
        if hit is not None:  # gone since the index answered
            hits.append(hit)
    return sorted(hits, key=lambda hit: hit.score, reverse=True)


def _scored(prefix: str, model: str, key: str, raw: dict[bytes, bytes], query: np.ndarray,
            wanted: tuple[str, ...]) -> Hit | None:
    """A hit of hash ``raw`` scored against the unit vector ``query`` (``None``: no vector
    of the query's dimension)."""
    try:
        stored = stored_vector(raw.get(b"embedding", b""), query.shape[0])
    except ValueError:
        return None
    score = float(stored @ query / (np.linalg.norm(stored) or 1.0))
    fields = {name: _text(raw.get(name.encode(), b"")) for name in wanted}
    doc_id = _text(raw.get(b"id", b"")) or _id_from_key(prefix, model, key)
    return _hit(doc_id, key, score, fields)


def _scan(
    client: Client, prefix: str, model: str, vec: np.ndarray,
    filters: Sequence[Filter], wanted: tuple[str, ...], tenant: str | None = None,
) -> list[Hit]:
    query = vec / (np.linalg.norm(vec) or 1.0)
    scored: list[Hit] = []
    pattern = result_key(prefix, model, "*", tagged=is_cluster(client))
    for key in client.scan_iter(match=pattern, count=1000):
        raw: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
        if tenant is not None and raw.get(TENANT_FIELD.encode()) != tenant.encode():
            continue
        if not all(f.matches(_optional_text(raw.get(meta_field(f.field).encode())))
                   for f in filters):
            continue
        hit = _scored(prefix, model, _text(key), raw, query, wanted)
        if hit is not None:  # None: another dimension, or no vector
            scored.append(hit)
    scored.sort(key=lambda hit: hit.score, reverse=True)
    return scored


def _hit(doc_id: str, key: str, score: float, fields: dict[str, str]) -> Hit:
    metadata = metadata_of(fields)
    shown = {name: value for name, value in fields.items()
             if name != "metadata" and (value or name != TENANT_FIELD)}  # untenanted: no field
    return Hit(id=doc_id, key=key, score=score, fields=shown, metadata=metadata)


def _id_from_key(prefix: str, model: str, key: str) -> str:
    """A document id from a chunk's key (for hashes without an ``id`` field)."""
    # Only for hashes without an ``id`` field (the sink always writes one): a segment in
    # braces with none inside is taken for a cluster's tagged one.
    segment = key[len(f"{prefix}:{model}:"):].split("#", 1)[0]
    tagged = segment[:1] == "{" and segment[-1:] == "}" and "{" not in segment[1:-1] and (
        "}" not in segment[1:-1])
    return id_of_segment(segment, tagged=tagged)


def _vector_type(client: redis.Redis, name: str) -> str:
    """The vector type of index ``name`` (cached for a minute)."""
    return _cached(_index_types, (_server(client), name), lambda: index_vector_type(client, name))


def _cached(cache: dict[K, tuple[float, V]], key: K, compute: Callable[[], V]) -> V:
    """``cache[key]`` if it is younger than ``_TYPE_TTL_S``, else ``compute()``, remembered."""
    now = time.monotonic()
    hit = cache.get(key)
    if hit is not None and now - hit[0] < _TYPE_TTL_S:
        return hit[1]
    value = compute()
    cache[key] = (now, value)
    return value


def _server(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db')}{kwargs.get('path', '')}"


_TAG_SPECIAL = re.compile(r"([^A-Za-z0-9])")


def _escape_tag(value: str) -> str:
    r"""Escape a tag value for a query: every character but letters and digits. (An
    underscore too: RediSearch reads a value of underscores alone, ``{_}``, as a syntax
    error, and ``\_`` as the underscore.)"""
    return _TAG_SPECIAL.sub(r"\\\1", value)


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
