"""Nearest-neighbour search over stored embeddings.

Uses the model's vector index (FT.SEARCH KNN) where the server has one; on a
server without the search module it falls back to an exact scan of the
model's keys, which is fine for development-sized data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import redis
from redis.commands.search.query import Query

from embedstream.errors import SinkError
from embedstream.sinks.redis import has_search, index_name, result_key

# Not "id": redis-py's search Document uses that attribute for the key.
_RETURN_FIELDS = ("text", "path", "model", "modality", "created_at", "source")


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    key: str
    score: float  # cosine similarity, 1.0 = same direction
    fields: dict[str, str] = field(default_factory=dict)


def search_vector(
    client: redis.Redis, prefix: str, model: str, vector: np.ndarray, k: int
) -> list[Hit]:
    """The ``k`` stored items of ``model`` nearest to ``vector``, best first."""
    query_vec = np.asarray(vector, dtype="<f4").tobytes()
    try:
        if has_search(client):
            return _knn(client, prefix, model, query_vec, k)
        return _scan(client, prefix, model, np.frombuffer(query_vec, "<f4"), k)
    except redis.RedisError as err:
        raise SinkError(f"search in Redis failed: {err}") from err


def _knn(client: redis.Redis, prefix: str, model: str, vec: bytes, k: int) -> list[Hit]:
    query = (
        Query(f"*=>[KNN {k} @embedding $vec AS distance]")
        .sort_by("distance")
        .return_fields("distance", *_RETURN_FIELDS)
        .paging(0, k)
        .dialect(2)
    )
    result = client.ft(index_name(prefix, model)).search(query, query_params={"vec": vec})
    key_start = len(result_key(prefix, model, ""))
    hits = []
    for doc in result.docs:
        fields = {name: _text(getattr(doc, name, "")) for name in _RETURN_FIELDS}
        # The index's COSINE metric returns a distance: 1 - cosine similarity.
        score = 1.0 - float(_text(doc.distance))
        key = _text(doc.id)
        hits.append(Hit(id=key[key_start:], key=key, score=score, fields=fields))
    return hits


def _scan(client: redis.Redis, prefix: str, model: str, vec: np.ndarray, k: int) -> list[Hit]:
    query = vec / (np.linalg.norm(vec) or 1.0)
    key_start = len(result_key(prefix, model, ""))
    scored: list[tuple[float, str, dict[str, str]]] = []
    for key in client.scan_iter(match=result_key(prefix, model, "*"), count=1000):
        raw: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
        stored = np.frombuffer(raw.get(b"embedding", b""), dtype="<f4")
        if stored.shape != query.shape:
            continue
        score = float(stored @ query / (np.linalg.norm(stored) or 1.0))
        fields = {name: _text(raw.get(name.encode(), b"")) for name in _RETURN_FIELDS}
        scored.append((score, _text(key), fields))
    scored.sort(key=lambda hit: hit[0], reverse=True)
    return [Hit(id=key[key_start:], key=key, score=s, fields=f) for s, key, f in scored[:k]]


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
