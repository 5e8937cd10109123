"""Vector index configuration: which index each model gets, and how its vectors are encoded.

Every model's index (``<prefix>:idx:<model>``) is created with an
:class:`IndexConfig`: the algorithm (``HNSW``, ``FLAT``, or ``SVS-VAMANA`` on
servers that have it: Redis 8.2+), the graph parameters ``M``,
``EF_CONSTRUCTION`` and ``EF_RUNTIME``, and the vector type (``FLOAT32`` or
``FLOAT16``). It comes from the settings (``EMBEDSTREAM_INDEX_*``) with the
model manifest's ``extra["index"]`` over them, and is applied only when the
index is created: a server cannot change these in place, so an index whose
settings differ from the ones asked for explicitly is refused with the way out
(a rollout to a new index under a new model name). An index made under older
*defaults* is kept as it is, with a warning, so upgrading never stops a worker.

The stored vector and the query vector must have the index's type. Every
writer encodes with :func:`vector_bytes`, every reader of a stored vector
decodes with :func:`stored_vector`, and the query side learns the type of an
existing index from the server (:func:`index_vector_type`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import redis
from redis.commands.search.field import VectorField

from embedstream.errors import ConfigError
from embedstream.models.manifest import Manifest
from embedstream.sections import RedisSettings

log = logging.getLogger(__name__)

ALGORITHMS = ("HNSW", "FLAT", "SVS-VAMANA")
VECTOR_TYPES = ("FLOAT32", "FLOAT16")
_DTYPES: dict[str, np.dtype[Any]] = {"FLOAT32": np.dtype("<f4"), "FLOAT16": np.dtype("<f2")}
DISTANCE_METRIC = "COSINE"

# Manifest ``extra.index`` keys -> IndexConfig fields.
_MANIFEST_KEYS = {
    "algorithm": "algorithm", "vector_type": "vector_type", "type": "vector_type",
    "m": "m", "ef_construction": "ef_construction", "ef_runtime": "ef_runtime",
}
_SETTINGS_FIELDS = {
    "algorithm": "index_algorithm", "vector_type": "index_vector_type", "m": "index_m",
    "ef_construction": "index_ef_construction", "ef_runtime": "index_ef_runtime",
}


@dataclass(frozen=True, slots=True)
class IndexConfig:
    """How one model's vector index is built. Defaults: the settings' defaults."""

    algorithm: str = "HNSW"
    vector_type: str = "FLOAT32"
    m: int = 16
    """HNSW: most edges per node and layer (2·M on layer 0); SVS-VAMANA: GRAPH_MAX_DEGREE = 2·M."""
    ef_construction: int = 64
    """HNSW: candidates kept while inserting; SVS-VAMANA: CONSTRUCTION_WINDOW_SIZE."""
    ef_runtime: int = 100
    """HNSW: candidates kept while searching (the index's default for every query);
    SVS-VAMANA: SEARCH_WINDOW_SIZE."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"index algorithm {self.algorithm!r}: use one of {ALGORITHMS}")
        if self.vector_type not in VECTOR_TYPES:
            raise ConfigError(f"index vector type {self.vector_type!r}: use one of {VECTOR_TYPES}")
        for name in ("m", "ef_construction", "ef_runtime"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"index {name} must be a positive integer, not {value!r}")

    def attributes(self, dimension: int) -> dict[str, Any]:
        """The vector field's attributes in FT.CREATE."""
        attrs: dict[str, Any] = {
            "TYPE": self.vector_type, "DIM": dimension, "DISTANCE_METRIC": DISTANCE_METRIC,
        }
        if self.algorithm == "HNSW":
            attrs.update(M=self.m, EF_CONSTRUCTION=self.ef_construction,
                         EF_RUNTIME=self.ef_runtime)
        elif self.algorithm == "SVS-VAMANA":
            attrs.update(GRAPH_MAX_DEGREE=2 * self.m,
                         CONSTRUCTION_WINDOW_SIZE=self.ef_construction,
                         SEARCH_WINDOW_SIZE=self.ef_runtime)
        return attrs

    def describe(self) -> str:
        """``HNSW M 16 EF_CONSTRUCTION 200 EF_RUNTIME 10 FLOAT32``: what matters of it."""
        if self.algorithm == "FLAT":
            return f"FLAT {self.vector_type}"
        return (f"{self.algorithm} M {self.m} EF_CONSTRUCTION {self.ef_construction} "
                f"EF_RUNTIME {self.ef_runtime} {self.vector_type}")

    def same_index(self, other: IndexConfig) -> bool:
        """Whether an index built with ``other`` is the one this config builds."""
        if self.algorithm != other.algorithm or self.vector_type != other.vector_type:
            return False
        return self.algorithm == "FLAT" or self == other


PREVIOUS_DEFAULTS = IndexConfig(algorithm="HNSW", vector_type="FLOAT32", m=16,
                                ef_construction=200, ef_runtime=10)
"""What every index was created with before the index settings existed
(RediSearch's own HNSW defaults): the bench's ``today`` configuration."""


def settings_config(settings: RedisSettings) -> IndexConfig:
    """The index configuration the settings ask for (before any manifest override)."""
    return IndexConfig(**{name: getattr(settings, field)
                          for name, field in _SETTINGS_FIELDS.items()})


def index_config(manifest: Manifest, settings: RedisSettings) -> IndexConfig:
    """The index ``manifest``'s model gets: the settings, then ``extra.index`` over them.

    Raises :class:`ConfigError` on an unknown key or a bad value in the manifest.
    """
    base = settings_config(settings)
    raw = manifest.extra.get("index")
    if raw is None:
        return base
    if not isinstance(raw, dict):
        raise ConfigError(f"model {manifest.name}: extra.index must be an object")
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        name = _MANIFEST_KEYS.get(str(key).lower())
        if name is None:
            raise ConfigError(f"model {manifest.name}: unknown extra.index key {key!r}; "
                              f"known: {sorted(_MANIFEST_KEYS)}")
        changes[name] = value.upper() if isinstance(value, str) else value
    try:
        return replace(base, **changes)
    except ConfigError as err:
        raise ConfigError(f"model {manifest.name}: extra.index: {err}") from err


def explicit(manifest: Manifest, settings: RedisSettings) -> bool:
    """Whether the index settings were asked for (environment, flags, manifest) rather
    than left at their defaults."""
    return "index" in manifest.extra or bool(
        set(_SETTINGS_FIELDS.values()) & settings.explicit)


def vector_field(config: IndexConfig, dimension: int, name: str = "embedding") -> VectorField:
    """The schema field of the vector for FT.CREATE."""
    return VectorField(name, config.algorithm, config.attributes(dimension))


def creation_error(config: IndexConfig, err: redis.ResponseError) -> ConfigError | None:
    """A clear :class:`ConfigError` when FT.CREATE refused an algorithm or type this
    server does not have (``SVS-VAMANA`` before Redis 8.2); ``None`` otherwise."""
    message = str(err)
    if "Bad arguments for vector similarity" in message or "Unknown argument" in message:
        return ConfigError(
            f"this Redis cannot create a {config.describe()} index ({message}); "
            f"choose another EMBEDSTREAM_INDEX_ALGORITHM (SVS-VAMANA needs Redis 8.2 or later)"
        )
    return None


# --------------------------------------------------------------------------- vectors


def vector_bytes(vector: Any, vector_type: str = "FLOAT32") -> bytes:
    """The little-endian bytes of ``vector`` as stored in a hash and sent in a query.

    Raises ``ValueError`` for an unknown type or a value the type cannot hold
    (a finite float32 beyond FLOAT16's ±65504 would become infinite).
    """
    try:
        dtype = _DTYPES[vector_type]
    except KeyError:
        raise ValueError(f"unknown vector type {vector_type!r}") from None
    source = np.asarray(vector, dtype=np.float32)
    with np.errstate(over="ignore"):  # checked just below
        converted = source.astype(dtype, copy=False)
    if dtype != source.dtype and not np.isfinite(converted).all() and np.isfinite(source).all():
        raise ValueError(f"vector values beyond the range of {vector_type}")
    return converted.tobytes()


def stored_vector(blob: bytes, dimension: int) -> np.ndarray:
    """A stored ``embedding`` back as float32, whichever type it was written in.

    The type follows from the length (4 or 2 bytes per dimension), so a reader
    needs only the model's dimension. Raises ``ValueError`` for any other length.
    """
    for dtype in _DTYPES.values():
        if len(blob) == dimension * dtype.itemsize:
            return np.frombuffer(blob, dtype=dtype).astype(np.float32)
    raise ValueError(f"a stored vector of {len(blob)} bytes is not {dimension}-d "
                     f"FLOAT32 or FLOAT16")


# --------------------------------------------------------------------------- existing indexes


def existing_config(info: dict[Any, Any]) -> tuple[IndexConfig | None, int | None]:
    """The configuration and dimension of an index's ``embedding`` field, from FT.INFO.

    Fields FT.INFO does not show (EF_RUNTIME on RediSearch 2.x) keep the
    defaults; :func:`runtime_ef` reads it where the server allows.
    """
    for attribute in info.get("attributes", []):
        values = [v.decode() if isinstance(v, bytes) else v for v in attribute]
        pairs = {str(k).lower(): v for k, v in zip(values[::2], values[1::2], strict=False)}
        if "embedding" not in (pairs.get("identifier"), pairs.get("attribute")):
            continue
        dimension = int(pairs["dim"]) if "dim" in pairs else None
        algorithm = str(pairs.get("algorithm", "HNSW")).upper().replace("_", "-")
        kind = str(pairs.get("data_type", "FLOAT32")).upper()
        if algorithm not in ALGORITHMS or kind not in VECTOR_TYPES:
            # An index made by hand with something we do not make (BFLOAT16, ...).
            return None, dimension
        config = IndexConfig(algorithm=algorithm, vector_type=kind)
        if algorithm == "HNSW":
            config = replace(config, m=int(pairs.get("m", config.m)),
                             ef_construction=int(pairs.get("ef_construction",
                                                           config.ef_construction)))
        return config, dimension
    return None, None


def vecsim_info(client: redis.Redis, name: str) -> dict[str, Any] | None:
    """The vector library's own view of an index's ``embedding`` field (FT.DEBUG
    VECSIM_INFO: EF_RUNTIME, the tiered index's frontend buffer, ...), nested lists as
    dicts; ``None`` where the server does not answer it."""
    try:
        reply = client.execute_command("FT.DEBUG", "VECSIM_INFO", name, "embedding")
    except redis.ResponseError:
        return None
    return _as_dict(reply) if isinstance(reply, list) else None


def _as_dict(reply: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in zip(reply[::2], reply[1::2], strict=False):
        text = key.decode() if isinstance(key, bytes) else str(key)
        if isinstance(value, list) and len(value) % 2 == 0:
            value = _as_dict(value)
        elif isinstance(value, bytes):
            value = value.decode()
        out[text] = value
    return out


def runtime_ef(client: redis.Redis, name: str) -> int | None:
    """An HNSW index's EF_RUNTIME, where the server tells it; ``None`` where it does not."""
    info = vecsim_info(client, name)
    if info is None:
        return None
    value = info.get("BACKEND_INDEX", {}).get("EF_RUNTIME", info.get("EF_RUNTIME"))
    return int(value) if value is not None else None


def check_existing(
    client: redis.Redis, name: str, manifest: Manifest, wanted: IndexConfig,
    info: dict[Any, Any], asked: bool,
) -> IndexConfig:
    """Compare an existing index with the configuration wanted for ``manifest``.

    Returns the configuration the index has (what writes must follow: its
    vector type). Raises :class:`ConfigError` for another dimension, or when
    settings ``asked`` for explicitly differ from the index's; an index made
    under other defaults is kept, with a warning.
    """
    have, dimension = existing_config(info)
    if dimension is not None and dimension != manifest.dimension:
        raise ConfigError(
            f"index {name} holds {dimension}-d vectors but model {manifest.name} makes "
            f"{manifest.dimension}-d ones: give the new model another name"
        )
    if have is None:
        log.warning("index %s has a vector field embedstream does not make; kept as it is", name)
        return wanted
    if have.algorithm == wanted.algorithm == "HNSW":
        ef = runtime_ef(client, name)
        have = replace(have, ef_runtime=ef if ef is not None else wanted.ef_runtime)
    if have.same_index(wanted):
        return have
    if asked:
        raise ConfigError(
            f"index {name} was created as {have.describe()}, but model {manifest.name} asks "
            f"for {wanted.describe()}. An index's settings cannot change in place: roll out to "
            f"a new index (give the model a new name, e.g. {manifest.name}-v2, with these "
            f"settings, re-embed into it with `embedstream replay topic --model "
            f"{manifest.name}-v2`, move queries over, then drop {name}), or set the index "
            f"settings back to the existing index's"
        )
    log.warning("index %s was created as %s; the defaults are now %s. It is kept as it is: "
                "roll out to a new model name to use the new settings", name, have.describe(),
                wanted.describe())
    return have


def index_vector_type(client: redis.Redis, name: str) -> str:
    """The vector type of an existing index (FT.INFO); ``FLOAT32`` when it cannot tell."""
    info = client.ft(name).info()
    config, _ = existing_config(info)
    return config.vector_type if config is not None else "FLOAT32"

