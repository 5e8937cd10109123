"""Redis sink: one HASH per embedding, one vector index per model.

Key ``<prefix>:<model>:<id>`` holds ``embedding`` (float32 little-endian
bytes), ``version`` (writes never replace a newer version; equal versions
are ordered by the record's offset, then partition), ``id``,
``model``, ``modality``, ``dim``, ``created_at`` (unix seconds), ``event_ts``
(the record's timestamp, ms), ``source`` (topic:partition:offset), ``text``
(text events, unless ``store_text`` is off), the event's metadata fields and,
for token-mode models, ``token_embeddings`` (``[token_count, dim]`` float32
bytes) and ``token_count``. Each batch is one
pipelined round trip. Where the server has the search module (Redis 8,
Redis Stack, Valkey + RediSearch) each model gets an HNSW/COSINE index over
its prefix; without it, vectors are still stored.

Failures are classified once, here: a reply about one item's data (a script
error, ``WRONGTYPE``, a value the client cannot encode) rejects that item
and the rest of the batch is stored; a reply about the server (unreachable,
``BUSY``, ``LOADING``, ``TRYAGAIN``, ``CLUSTERDOWN``, a failover) raises
:class:`SinkError`; a full server (``OOM``) raises :class:`StoreFull`.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.commands.search.field import NumericField, TagField
from redis.commands.search.index_definition import IndexDefinition, IndexType
from redis.retry import Retry

from embedstream.envelope import RESERVED_FIELDS
from embedstream.errors import ConfigError, SinkError, StoreFull
from embedstream.models.manifest import Manifest
from embedstream.settings import Settings
from embedstream.sinks import index as vector_index
from embedstream.sinks.base import Embedded, Rejected, WriteOutcome
from embedstream.sinks.index import IndexConfig

log = logging.getLogger(__name__)

# Versioned, idempotent write of one result: KEYS[1] the key, ARGV[1] the
# version, ARGV[2] the record's partition, ARGV[3] its offset, ARGV[4..]
# field/value pairs. Returns 1 stored, 2 duplicate (this very record is there
# already), 0 stale (a newer one is there). Equal versions (two updates in one
# millisecond, a LogAppendTime batch) are ordered by offset, then partition, read
# back from the stored ``source`` (topic:partition:offset): processing order
# never decides. DEL first so metadata fields of an older version do not linger;
# HSET in slices, as Lua's unpack() has a small limit on results. The shebang makes it
# a flagged script: a server out of memory refuses it with OOM before it runs (a script
# without flags would write past maxmemory, and nobody would learn the store is full).
_WRITE_SCRIPT = """#!lua
local current = redis.call('HMGET', KEYS[1], 'version', 'source')
local version = tonumber(ARGV[1])
local partition = tonumber(ARGV[2])
local offset = tonumber(ARGV[3])
if current[1] then
  local stored = tonumber(current[1])
  if stored > version then return 0 end
  if stored == version then
    local p, o = -1, -1
    if current[2] then
      local sp, so = string.match(current[2], ':(%d+):(%d+)$')
      if sp then p = tonumber(sp); o = tonumber(so) end
    end
    if o > offset or (o == offset and p > partition) then return 0 end
    if o == offset and p == partition then return 2 end
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', ARGV[1])
for i = 4, #ARGV, 256 do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 255, #ARGV)))
end
return 1
"""

# Replies that are about the server, not the item: retry the batch later.
_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
    redis.exceptions.NoScriptError, redis.exceptions.ReadOnlyError,
    redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError,
    redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError, redis.exceptions.AskError, redis.exceptions.MovedError,
    redis.exceptions.ExecAbortError, redis.exceptions.ClusterError,
)
_TRANSIENT_CODES = frozenset({"BUSY", "NOREPLICAS", "UNBLOCKED", "LOADING", "TRYAGAIN",
                              "CLUSTERDOWN", "MASTERDOWN", "READONLY", "NOSCRIPT"})


def classify(err: Exception) -> str:
    """``full`` (out of memory), ``transient`` (about the server) or ``item``.

    Anything not known to be about the server is about the item: a reply the
    server would give again for that item alone.
    """
    message = str(err)
    if isinstance(err, redis.exceptions.OutOfMemoryError) or "OOM command not allowed" in message:
        return "full"
    if isinstance(err, _TRANSIENT_ERRORS):
        return "transient"
    code = getattr(err, "status_code", None) or message.split(" ", 1)[0]
    return "transient" if code in _TRANSIENT_CODES else "item"


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


def connect(settings: Settings, *, quick: bool = False, retries: bool = True) -> redis.Redis:
    """A client for ``settings.redis_url``; the password field overrides the URL's.

    ``quick``: one-second timeouts and no retries, for health checks.
    ``retries=False``: redis-py retries nothing, for callers that retry
    themselves (the worker's sink), so two retry loops never stack.
    """
    timeout = settings.redis_socket_timeout_s
    kwargs: dict[str, Any] = {
        "socket_timeout": 1.0 if quick else timeout,
        "socket_connect_timeout": 1.0 if quick else min(timeout, 5.0),
        "health_check_interval": 30,
        "protocol": 2,
    }
    if quick or not retries:
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

    WRITES_VECTOR_TYPES: tuple[str, ...] = ("FLOAT32",)
    """Vector types :meth:`write` stores; :meth:`prepare` refuses an index of another."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self._client = client if client is not None else connect(settings, retries=False)
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
        self.index_configs: dict[str, IndexConfig] = {}
        """Model name -> the configuration its index has (after :meth:`prepare`); writes
        must store vectors in its ``vector_type``."""

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
        # Index settings (algorithm, graph, vector type): see embedstream.sinks.index.
        wanted = vector_index.index_config(manifest, self._settings)
        try:
            info = search.info()
        except redis.ResponseError:
            info = None
        if info is not None:
            have = vector_index.check_existing(
                self._client, name, manifest, wanted, info,
                asked=vector_index.explicit(manifest, self._settings))
            self._check_writable(name, have)
            self.index_configs[manifest.name] = have
            self._add_fields(search, name, schema, _index_attributes(info))
            return
        self._check_writable(name, wanted)
        try:
            search.create_index(
                [
                    vector_index.vector_field(wanted, manifest.dimension),
                    TagField("model"),
                    TagField("modality"),
                    NumericField("created_at"),
                    *(_metadata_field(field, kind) for field, kind in schema.items()),
                ],
                definition=IndexDefinition(
                    prefix=[result_key(self._prefix, manifest.name, "")],
                    index_type=IndexType.HASH,
                ),
            )
        except redis.ResponseError as err:
            unsupported = vector_index.creation_error(wanted, err)
            if unsupported is not None:
                raise unsupported from err
            raise
        self.index_configs[manifest.name] = wanted
        log.info("created vector index %s (%d-d, %s, cosine)", name, manifest.dimension,
                 wanted.describe())

    def _check_writable(self, name: str, config: IndexConfig) -> None:
        if config.vector_type not in self.WRITES_VECTOR_TYPES:
            raise ConfigError(
                f"index {name}: {config.vector_type} vectors are not written by this version "
                f"(it stores {', '.join(self.WRITES_VECTOR_TYPES)}); set "
                f"EMBEDSTREAM_INDEX_VECTOR_TYPE=FLOAT32"
            )

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
        """Store ``results`` in one pipelined round trip.

        Items the server (or the client's encoder) refuses for their own data
        come back in ``WriteOutcome.rejected``; everything else is stored.
        Raises :class:`StoreFull` or :class:`SinkError` for failures about the
        server: then any part of the batch may be stored, and a retry of the
        whole batch is safe (those items come back as duplicates).
        """
        now = time.time()
        encoder = self._client.get_encoder()
        pipe = self._client.pipeline(transaction=False)
        sent: list[int] = []  # index in ``results`` of each command in the pipeline
        rejected: list[Rejected] = []
        for index, result in enumerate(results):
            try:
                args = [encoder.encode(a) for a in self._script_args(result, now)]
            except (redis.DataError, UnicodeError, ValueError, TypeError) as err:
                rejected.append(Rejected(index, f"cannot encode a field: {err}"))
                continue
            key = result_key(self._prefix, result.model.name, result.event.id)
            self._script(keys=[key], args=args, client=pipe)
            sent.append(index)
        if not sent:
            return WriteOutcome(rejected=tuple(rejected))
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as err:
            raise self._failure(err, len(results)) from err
        codes: list[int] = []
        for index, reply in zip(sent, replies, strict=True):
            if not isinstance(reply, Exception):
                codes.append(int(reply))
            elif classify(reply) == "item":
                rejected.append(Rejected(index, f"Redis refused the write: {reply}"))
            else:
                raise self._failure(reply, len(results)) from reply
        return WriteOutcome(
            stored=codes.count(1), duplicates=codes.count(2), stale=codes.count(0),
            rejected=tuple(sorted(rejected, key=lambda r: r.index)),
        )

    def _script_args(self, result: Embedded, now: float) -> list[Any]:
        """ARGV of the write script: version, partition, offset, then field/value pairs."""
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
        args: list[Any] = [event.version, max(0, record.partition), max(0, record.offset)]
        for name, value in fields.items():
            args.extend((name, value))
        return args

    @staticmethod
    def _failure(err: Exception, size: int) -> SinkError:
        if classify(err) == "full":
            return StoreFull(f"Redis is out of memory; {size} results not written: {err}")
        return SinkError(f"Redis write of {size} results failed: {err}")

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
