"""The search side of the gateway: embed a query, search a model's index, read vectors.

Queries are embedded with the same ONNX models the workers run
(:func:`embedstream.runtime.loader.load_configured`), through one
:class:`~embedstream.batching.DynamicBatcher` per model under the worker's batch
budget: concurrent requests (``/v1/search`` queries and ``/v1/embeddings``
inputs alike) share model calls instead of queueing one text at a time.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from embedstream.batching import BatchBudget, DynamicBatcher
from embedstream.errors import EnvelopeError, GatewayError, ModelError, SinkError
from embedstream.models.routing import default_models
from embedstream.preprocess.base import Prepared
from embedstream.rollout.query import serving
from embedstream.runtime.loader import LoadedModel, load_configured
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
    shorter_dims: tuple[int, ...] = ()
    """Shorter lengths the model was trained to be cut to (Matryoshka), from its manifest's
    ``extra.matryoshka_dims``; empty for most models."""


class Searcher:
    """Embeds queries and searches Redis. Thread-safe (ONNX Runtime sessions are)."""

    def __init__(self, settings: Settings, models: dict[str, LoadedModel], client: Client,
                 loader: Callable[[str], LoadedModel] | None = None) -> None:
        self._settings = settings
        self._models = models
        self._client = client
        self.info = {name: self._info(m) for name, m in models.items()}
        # The worker's budget, with no added wait (see embedstream.batching.dynamic).
        self._budget = BatchBudget(settings.batch_max_items, settings.batch_max_tokens, 0.0,
                                   settings.batch_max_padding)
        self._batchers = {name: DynamicBatcher(name, m.embed_prepared, self._budget)
                          for name, m in models.items()}
        # The same rule as the worker's, so a query embeds with the model ingest used.
        self._defaults = default_models(settings, self.served())
        self._loader = loader or (lambda name: load_configured(
            settings, [name], threads=settings.intra_op_threads or 1)[name])
        self._load_lock = threading.Lock()

    def _info(self, model: LoadedModel) -> ModelInfo:
        m = model.manifest
        return ModelInfo(m.name, m.modality, m.dimension, metadata_schema(m, self._settings.redis),
                         tuple(int(d) for d in m.extra.get("matryoshka_dims", ())))

    def served(self) -> dict[str, str]:
        """Model name -> modality."""
        return {name: info.modality for name, info in self.info.items()}

    def model_for(self, name: str | None, modality: str) -> ModelInfo:
        """The model serving the named one (itself, or NEW of a promoted rollout; loaded
        from the model store on first use), or the default one of ``modality``."""
        try:
            if name is not None and name not in self.info:  # retired here, served by another
                current = serving(self._client, self._settings.key_prefix, name)
                if current != name:
                    return self._served_model(current)
            public = self._public(name, modality)
            current = serving(self._client, self._settings.key_prefix, public.name)
        except SinkError as err:
            raise GatewayError(503, "store_unavailable", str(err)) from err
        return public if current == public.name else self._served_model(current)

    def _served_model(self, name: str) -> ModelInfo:
        with self._load_lock:
            if name not in self.info:
                try:
                    model = self._loader(name)
                except Exception as err:
                    raise GatewayError(503, "model_unavailable",
                                       f"model {name} serves this name but cannot be loaded "
                                       f"here: {err}") from err
                self._models[name] = model
                self._batchers[name] = DynamicBatcher(name, model.embed_prepared, self._budget)
                self.info[name] = self._info(model)
                log.info("loaded %s for queries (a promoted rollout)", name)
            return self.info[name]

    def _public(self, name: str | None, modality: str) -> ModelInfo:
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
        """One query's vector (blocks; for handlers run in the thread pool)."""
        (future,) = self.submit(info, self.prepare(info, [query]))
        return self.vector_of(future)

    def prepare(self, info: ModelInfo, inputs: Sequence[str | bytes]) -> list[Prepared]:
        """Tokenize (or decode) inputs for ``info``'s model; a 422 names the first bad one."""
        model = self._models[info.name]
        if getattr(model, _EMBEDDERS[info.modality], None) is None:
            raise GatewayError(501, "not_implemented",
                               f"{info.modality} queries are not supported by this build")
        try:
            results = model.preprocessor.prepare(inputs)
        except (ValueError, OSError) as err:  # undecodable image / audio bytes
            raise GatewayError(422, "invalid_media", f"cannot read the input: {err}") from err
        prepared: list[Prepared] = []
        for index, result in enumerate(results):
            if isinstance(result, EnvelopeError):  # the preprocessor refused it (bad media...)
                where = f"input {index}" if len(inputs) > 1 else "the query"
                raise GatewayError(422, result.reason, f"cannot embed {where}: {result.detail}")
            prepared.append(result)
        return prepared

    def submit(self, info: ModelInfo, prepared: list[Prepared]) -> list[Future[np.ndarray]]:
        """Queue prepared inputs on the model's batcher; one future per input."""
        return self._batchers[info.name].submit([(p, p.cost) for p in prepared])

    @staticmethod
    def vector_of(future: Future[np.ndarray]) -> np.ndarray:
        """A submitted input's vector (float32), or the 422 its model call raised."""
        try:
            return np.asarray(future.result(), dtype=np.float32)
        except ModelError as err:
            raise GatewayError(422, "model_error", f"cannot embed the input: {err}") from err

    def stored_vector(self, info: ModelInfo, event_id: str, chunk: int = 0,
                      tenant: str | None = None) -> tuple[np.ndarray, dict[str, str]]:
        """A stored chunk's vector and fields (chunk 0: the document's first, or only).

        ``tenant``: the id in that tenant's id space (None: the untenanted one); a
        tenant's key never reads another's item, even one with the same id.
        """
        key = result_key(self._settings.key_prefix, info.name, event_id, chunk, tenant,
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
               exclude: str | None = None, per_document: bool = True,
               tenant: str | None = None) -> list[Hit]:
        """Nearest documents (``tenant``: that tenant's only)."""
        try:
            hits = search_vector(self._client, self._settings.key_prefix, info.name, vector,
                                 k + (1 if exclude else 0), filters, ("dim",), per_document,
                                 tenant=tenant,
                                 cluster_search=self._settings.redis_cluster_search)
        except SinkError as err:
            raise GatewayError(503, "store_unavailable", str(err)) from err
        # the query document itself: its id in the searched tenant's id space
        excluded = (tenant or "", exclude)
        return [h for h in hits if (h.fields.get("tenant") or "", h.id) != excluded][:k]

    def rollouts(self) -> list[dict[str, Any]]:
        """Every rollout recorded (``embedstream rollout status --json``)."""
        from embedstream.rollout.lifecycle import summaries

        try:
            return summaries(self._settings, self._client)
        except redis.RedisError as err:
            raise GatewayError(503, "store_unavailable", f"Redis: {err}") from err

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        """Stop the batchers and release the Redis connections (the app's shutdown)."""
        for batcher in self._batchers.values():
            batcher.close()
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
    # RediSearch's query syntax cannot carry control characters, escaped or not
    if any(unicodedata.category(ch) == "Cc" for v in values for ch in v):
        raise GatewayError(400, "invalid_filter",
                           f"tag filter {field!r}: a value holds a control character")
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
