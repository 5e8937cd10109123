"""The search side of the gateway: embed a query, search a model's index, read vectors.

Queries are embedded with the same ONNX models the workers run
(:func:`embedstream.runtime.loader.load_models`); image and audio queries use
``LoadedModel.embed_images`` / ``embed_audio`` where the model has them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from embedstream.errors import EnvelopeError, GatewayError, ModelError, SinkError
from embedstream.models.routing import default_models
from embedstream.runtime.loader import LoadedModel
from embedstream.search import Filter, Hit, RangeFilter, TagFilter, search_vector
from embedstream.settings import Settings
from embedstream.sinks.cluster import Client, is_cluster
from embedstream.sinks.redis import metadata_schema, result_key

log = logging.getLogger(__name__)

_EMBEDDERS = {"text": "embed_texts", "image": "embed_images", "audio": "embed_audio"}
_NUMERIC_OPS = ("gt", "gte", "lt", "lte")


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    modality: str
    dimension: int
    schema: dict[str, str]


class Searcher:
    """Embeds queries and searches Redis. Thread-safe (ONNX Runtime sessions are)."""

    def __init__(self, settings: Settings, models: dict[str, LoadedModel], client: Client) -> None:
        self._settings = settings
        self._models = models
        self._client = client
        self.info = {
            name: ModelInfo(name, m.manifest.modality, m.manifest.dimension,
                            metadata_schema(m.manifest, settings))
            for name, m in models.items()
        }
        # The same rule as the worker's, so a query embeds with the model ingest used.
        self._defaults = default_models(settings, self.served())

    def served(self) -> dict[str, str]:
        """Model name -> modality."""
        return {name: info.modality for name, info in self.info.items()}

    def model_for(self, name: str | None, modality: str) -> ModelInfo:
        """The named model, or the default one of ``modality``."""
        if name is not None:
            if name not in self.info:
                raise GatewayError(404, "unknown_model",
                                   f"model {name!r} is not served; served: {sorted(self.info)}")
            return self.info[name]
        default = self._defaults.get(modality)
        if default is None:
            raise GatewayError(404, "no_model",
                               f"no {modality} model served here; served: {sorted(self.info)}")
        return self.info[default]

    def embed(self, info: ModelInfo, query: str | bytes) -> np.ndarray:
        model = self._models[info.name]
        method = getattr(model, _EMBEDDERS[info.modality], None)
        if method is None:
            raise GatewayError(501, "not_implemented",
                               f"{info.modality} queries are not supported by this build")
        try:
            return np.asarray(method([query])[0], dtype=np.float32)
        except EnvelopeError as err:  # the preprocessor refused the query (bad media, ...)
            raise GatewayError(422, err.reason, f"cannot embed the query: {err.detail}") from err
        except ModelError as err:
            raise GatewayError(422, "model_error", f"cannot embed the query: {err}") from err
        except (ValueError, OSError) as err:  # undecodable image / audio bytes
            raise GatewayError(422, "invalid_media", f"cannot read the query file: {err}") from err

    def stored_vector(self, info: ModelInfo, event_id: str,
                      chunk: int = 0) -> tuple[np.ndarray, dict[str, str]]:
        """A stored chunk's vector and fields (chunk 0: the document's first, or only)."""
        key = result_key(self._settings.key_prefix, info.name, event_id, chunk,
                         tagged=is_cluster(self._client))
        try:
            raw: dict[bytes, bytes] = self._client.hgetall(key)  # type: ignore[assignment]
        except redis.RedisError as err:
            raise GatewayError(503, "store_unavailable", f"Redis: {err}") from err
        if not raw or b"embedding" not in raw:
            raise GatewayError(404, "not_found", f"no embedding {event_id!r} for model {info.name}")
        vector = np.frombuffer(raw[b"embedding"], dtype="<f4")
        fields = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                  for k, v in raw.items() if k != b"embedding"}
        return vector, fields

    def search(self, info: ModelInfo, vector: np.ndarray, k: int, filters: list[Filter],
               exclude: str | None = None, per_document: bool = True) -> list[Hit]:
        try:
            hits = search_vector(self._client, self._settings.key_prefix, info.name, vector,
                                 k + (1 if exclude else 0), filters, ("dim",), per_document,
                                 cluster_search=self._settings.redis_cluster_search)
        except SinkError as err:
            raise GatewayError(503, "store_unavailable", str(err)) from err
        return [h for h in hits if h.id != exclude][:k]

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        """Release the Redis connections (the app's shutdown)."""
        self._client.close()


def parse_filters(raw: Any, info: ModelInfo) -> list[Filter]:
    """``{"lang": "en" | ["en","de"], "year": 2005 | {"gte": 2000, "lt": 2020}}`` -> filters.

    Every field must be in the model's metadata schema (indexed), with a value
    that suits its type; anything else is a 400 naming the field.
    """
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise GatewayError(400, "invalid_filter", "'filters' must be a JSON object")
    filters: list[Filter] = []
    for field, value in raw.items():
        kind = info.schema.get(field)
        if kind is None:
            raise GatewayError(400, "invalid_filter",
                               f"{field!r} is not an indexed field of {info.name}; "
                               f"indexed: {sorted(info.schema)}")
        filters.append(_tag(field, value) if kind == "tag" else _range(field, value))
    return filters


def _tag(field: str, value: Any) -> TagFilter:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise GatewayError(400, "invalid_filter",
                           f"tag filter {field!r} takes a non-empty string or list of them")
    return TagFilter(field, tuple(values))


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise GatewayError(400, "invalid_filter", f"numeric filter {field!r} takes finite numbers")
    return float(value)


def _range(field: str, value: Any) -> RangeFilter:
    if not isinstance(value, dict):
        number = _number(field, value)
        return RangeFilter(field, number, number)
    unknown = set(value) - set(_NUMERIC_OPS)
    if unknown or not value:
        raise GatewayError(400, "invalid_filter",
                           f"numeric filter {field!r} takes {list(_NUMERIC_OPS)}, got {sorted(value)}")
    low = value.get("gte", value.get("gt"))
    high = value.get("lte", value.get("lt"))
    return RangeFilter(
        field,
        None if low is None else _number(field, low),
        None if high is None else _number(field, high),
        low_exclusive="gte" not in value and "gt" in value,
        high_exclusive="lte" not in value and "lt" in value,
    )
