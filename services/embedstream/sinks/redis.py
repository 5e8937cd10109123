"""Redis sink: one HASH per embedding, one vector index per model.

Key ``<prefix>:<model>:<id>`` holds ``embedding`` (float32 little-endian
bytes), ``version`` (writes never replace a newer version), ``id``,
``model``, ``modality``, ``dim``, ``created_at`` (unix seconds), ``event_ts``
(the record's timestamp, ms), ``source`` (topic:partition:offset), ``text``
(text events, unless ``store_text`` is off), the event's metadata fields and,
for token-mode models, ``token_embeddings`` (``[token_count, dim]`` float32
bytes) and ``token_count``. Each batch is one
pipelined round trip. Where the server has the search module (Redis 8,
Redis Stack, Valkey + RediSearch) each model gets an HNSW/COSINE index over
its prefix; without it, vectors are still stored.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.commands.search.field import NumericField, TagField, VectorField
from redis.commands.search.index_definition import IndexDefinition, IndexType
from redis.retry import Retry

from embedstream.envelope import RESERVED_FIELDS
from embedstream.errors import ConfigError, SinkError
from embedstream.models.manifest import Manifest
from embedstream.settings import Settings
from embedstream.sinks.base import Embedded, WriteOutcome

log = logging.getLogger(__name__)

# Versioned, idempotent write of one result: KEYS[1] the key, ARGV[1] the
# version, ARGV[2..] field/value pairs. Returns 1 stored, 2 duplicate (this
# version is there already), 0 stale (a newer version is there). DEL first so
# metadata fields of an older version do not linger.
_WRITE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'version')
local version = tonumber(ARGV[1])
if current then
  local stored = tonumber(current)
  if stored > version then return 0 end
  if stored == version then return 2 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', ARGV[1], unpack(ARGV, 2))
return 1
"""


def result_key(prefix: str, model: str, event_id: str) -> str:
    return f"{prefix}:{model}:{event_id}"


def index_name(prefix: str, model: str) -> str:
    return f"{prefix}:idx:{model}"


# Metadata field names that may be indexed: plain identifiers, so they need no
# escaping in queries.
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
FIELD_TYPES = ("tag", "numeric")


def metadata_schema(manifest: Manifest, settings: Settings) -> dict[str, str]:
    """Metadata fields indexed for ``manifest``'s model: name -> ``tag`` | ``numeric``.

    The manifest's ``extra["metadata_schema"]`` first, then ``settings.metadata_schema``
    (deployment config wins). Raises :class:`ConfigError` on a bad name or type.
    """
    raw = manifest.extra.get("metadata_schema") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"model {manifest.name}: extra.metadata_schema must be an object")
    schema = {**raw, **settings.metadata_schema}
    for name, kind in schema.items():
        if not FIELD_NAME.match(name) or name in RESERVED_FIELDS:
            raise ConfigError(f"model {manifest.name}: cannot index metadata field {name!r}")
        if kind not in FIELD_TYPES:
            raise ConfigError(
                f"model {manifest.name}: metadata field {name!r} has type {kind!r}; "
                f"use one of {FIELD_TYPES}"
            )
    return dict(sorted(schema.items()))


def connect(settings: Settings, *, quick: bool = False) -> redis.Redis:
    """A client for ``settings.redis_url``; the password field overrides the URL's.

    ``quick``: one-second timeouts and no retries, for health checks.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": 1.0 if quick else 10.0,
        "socket_connect_timeout": 1.0 if quick else 5.0,
        "health_check_interval": 30,
        "protocol": 2,
    }
    if quick:
        kwargs["retry"] = Retry(NoBackoff(), 0)
    if settings.redis_username is not None:
        kwargs["username"] = settings.redis_username
    if settings.redis_password is not None:
        kwargs["password"] = settings.redis_password.get_secret_value()
    if settings.redis_ssl_ca_file is not None:
        kwargs["ssl_ca_certs"] = str(settings.redis_ssl_ca_file)
    return redis.Redis.from_url(settings.redis_url, **kwargs)


def has_search(client: redis.Redis) -> bool:
    """True when the server offers FT.* commands (vector search)."""
    try:
        client.execute_command("FT._LIST")
    except redis.ResponseError:
        return False
    return True


class RedisSink:
    """See :class:`~embedstream.sinks.base.Sink`."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self._client = client if client is not None else connect(settings)
        self._prefix = settings.key_prefix
        self._create_index = settings.create_index
        self._store_text = settings.store_text
        self._script = self._client.register_script(_WRITE_SCRIPT)
        # A separate client for health checks: short timeouts, no retries, so a
        # readiness probe answers at once while Redis is away.
        self._health = connect(settings, quick=True) if client is None else client
        self._last_ping: tuple[float, bool] = (-1.0, True)
        self._settings = settings
        self.search_enabled = False

    def prepare(self, models: list[Manifest]) -> None:
        try:
            self.search_enabled = self._create_index and has_search(self._client)
            if not self.search_enabled:
                log.warning("Redis has no search module: vectors are stored but not indexed")
                return
            for manifest in models:
                self._ensure_index(manifest)
        except redis.RedisError as err:
            raise SinkError(f"cannot prepare Redis indexes: {err}") from err

    def _ensure_index(self, manifest: Manifest) -> None:
        name = index_name(self._prefix, manifest.name)
        search = self._client.ft(name)
        schema = metadata_schema(manifest, self._settings)
        try:
            info = search.info()
        except redis.ResponseError:
            info = None
        if info is not None:
            existing = _index_dimension(info)
            if existing is not None and existing != manifest.dimension:
                raise ConfigError(
                    f"index {name} holds {existing}-d vectors but model {manifest.name} makes "
                    f"{manifest.dimension}-d ones: give the new model another name"
                )
            self._add_fields(search, name, schema, _index_attributes(info))
            return
        search.create_index(
            [
                VectorField(
                    "embedding",
                    "HNSW",
                    {"TYPE": "FLOAT32", "DIM": manifest.dimension, "DISTANCE_METRIC": "COSINE"},
                ),
                TagField("model"),
                TagField("modality"),
                NumericField("created_at"),
                *(_metadata_field(field, kind) for field, kind in schema.items()),
            ],
            definition=IndexDefinition(
                prefix=[result_key(self._prefix, manifest.name, "")], index_type=IndexType.HASH
            ),
        )
        log.info("created vector index %s (%d-d, HNSW, cosine)", name, manifest.dimension)

    def _add_fields(
        self, search: Any, name: str, schema: dict[str, str], existing: set[str]
    ) -> None:
        """Index metadata fields declared since the index was made (FT.ALTER; the
        server re-indexes the existing hashes in the background)."""
        for field, kind in schema.items():
            if field not in existing:
                search.alter_schema_add([_metadata_field(field, kind)])
                log.info("index %s: added %s field %s", name, kind, field)

    def write(self, results: list[Embedded]) -> WriteOutcome:
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        for result in results:
            event = result.event
            record = event.record
            fields: dict[str, Any] = dict(event.metadata)
            fields.update(
                id=event.id,
                embedding=result.vector.astype("<f4", copy=False).tobytes(),
                model=result.model.name,
                modality=result.model.modality,
                dim=result.model.dimension,
                created_at=now,
                event_ts=record.timestamp_ms,
                source=f"{record.topic}:{record.partition}:{record.offset}",
            )
            if self._store_text and event.text is not None:
                fields["text"] = event.text
            if result.tokens is not None:
                fields["token_embeddings"] = result.tokens.astype("<f4", copy=False).tobytes()
                fields["token_count"] = int(result.tokens.shape[0])
            args: list[Any] = [event.version]
            for name, value in fields.items():
                args.extend((name, value))
            key = result_key(self._prefix, result.model.name, event.id)
            self._script(keys=[key], args=args, client=pipe)
        try:
            codes = pipe.execute()
        except redis.RedisError as err:
            raise SinkError(f"Redis write of {len(results)} results failed: {err}") from err
        return WriteOutcome(
            stored=codes.count(1), duplicates=codes.count(2), stale=codes.count(0)
        )

    def ping(self) -> bool:
        """A quick, cached liveness check (one round trip a second at most)."""
        now = time.monotonic()
        if now - self._last_ping[0] >= 1.0:
            try:
                ok = bool(self._health.ping())
            except redis.RedisError:
                ok = False
            self._last_ping = (now, ok)
        return self._last_ping[1]

    def close(self) -> None:
        self._client.close()
        self._health.close()


def _metadata_field(name: str, kind: str) -> TagField | NumericField:
    return TagField(name) if kind == "tag" else NumericField(name)


def _index_attributes(info: dict[Any, Any]) -> set[str]:
    """The attribute names of an index, from FT.INFO."""
    names = set()
    for attribute in info.get("attributes", []):
        values = [v.decode() if isinstance(v, bytes) else v for v in attribute]
        pairs = dict(zip(values[::2], values[1::2], strict=False))
        names.add(str(pairs.get("attribute") or pairs.get("identifier")))
    return names


def _index_dimension(info: dict[Any, Any]) -> int | None:
    """The DIM of the ``embedding`` vector field from FT.INFO, if found."""
    for attribute in info.get("attributes", []):
        values = [v.decode() if isinstance(v, bytes) else v for v in attribute]
        pairs = dict(zip(values[::2], values[1::2], strict=False))
        if pairs.get("identifier") == "embedding" or pairs.get("attribute") == "embedding":
            for i, value in enumerate(values):
                if str(value).lower() == "dim" and i + 1 < len(values):
                    return int(values[i + 1])
    return None
