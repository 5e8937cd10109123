"""Redis sink: documents as chunk hashes (see :mod:`.layout`), one vector index per model.

Each batch is one pipelined round trip: one script call per document writes
all of its chunks, versioned (writes never replace a newer version; equal
versions are ordered by the record's offset, then partition), deletes the
chunks an older version had beyond the new count, and respects a delete's
marker; one script call per deletion removes every chunk and leaves the
marker. Where the server has the search module (Redis 8, Redis Stack, Valkey
+ RediSearch) each model gets an HNSW/COSINE index over its prefix; without
it, vectors are still stored.

Failures are classified once, here: a reply about one item's data (a script
error, ``WRONGTYPE``, a value the client cannot encode) rejects that item
and the rest of the batch is stored; a reply about the server (unreachable,
``BUSY``, ``LOADING``, ``TRYAGAIN``, ``CLUSTERDOWN``, a failover) raises
:class:`SinkError`; a full server (``OOM``) raises :class:`StoreFull`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.commands.search.field import NumericField, TagField
from redis.commands.search.index_definition import IndexDefinition, IndexType
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from embedstream.envelope import flat_metadata
from embedstream.errors import ConfigError, SinkError, StoreFull, StoreUnavailable
from embedstream.models.manifest import Manifest
from embedstream.retry import Backoff, retry
from embedstream.sections import RedisSettings
from embedstream.sinks import cluster
from embedstream.sinks import index as vector_index
from embedstream.sinks.base import (
    DeleteOutcome,
    Deletion,
    Embedded,
    Rejected,
    WriteOutcome,
)
from embedstream.sinks.cluster import Client
from embedstream.sinks.index import IndexConfig
from embedstream.sinks.layout import (
    TENANT_FIELD,
    index_name,
    meta_field,
    result_key,
    tombstone_key,
)

log = logging.getLogger(__name__)

__all__ = ["RedisSink", "classify", "connect", "has_search", "index_name", "metadata_schema",
           "result_key"]

# Shared by the two scripts: is the record (v, o, p) older than, the same as, or newer
# than the one a hash's version and source (topic:partition:offset) name? Versions
# first, then offsets, then partitions: processing order never decides.
_ORDER = """
local function order(version, source)
  local p, o = -1, -1
  if source then
    local sp, so = string.match(source, ':(%d+):(%d+)$')
    if sp then p = tonumber(sp); o = tonumber(so) end
  end
  return tonumber(version), o, p
end
local function compare(v1, o1, p1, v2, o2, p2)
  if v1 ~= v2 then return v1 < v2 and -1 or 1 end
  if o1 ~= o2 then return o1 < o2 and -1 or 1 end
  if p1 ~= p2 then return p1 < p2 and -1 or 1 end
  return 0
end
"""

# Write one document. KEYS[1] chunk 0's key, KEYS[2] the delete marker's key,
# KEYS[3..] chunks 1..n-1. ARGV[1] version, ARGV[2] partition, ARGV[3] offset,
# ARGV[4] chunk count, then per chunk: its count of field/value arguments and
# the pairs. Returns 1 stored, 2 duplicate (this record is there already), 0
# stale (a newer version, or a newer delete, is there). Every chunk is DEL'd
# first so fields of an older version do not linger, and the chunks an older
# version had beyond the new count go too. HSET in slices (Lua's unpack() has a
# small limit). The shebang makes it a flagged script: a server out of memory
# refuses it with OOM before it runs, instead of letting it write past maxmemory.
_WRITE_SCRIPT = "#!lua\n" + _ORDER + """
local v, p, o = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local count = tonumber(ARGV[4])
local current = redis.call('HMGET', KEYS[1], 'version', 'source', 'chunks')
if current[1] then
  local c = compare(v, o, p, order(current[1], current[2]))
  if c < 0 then return 0 end
  if c == 0 then return 2 end
end
local marker = redis.call('HMGET', KEYS[2], 'version', 'source')
if marker[1] and compare(v, o, p, order(marker[1], marker[2])) <= 0 then return 0 end
local old = current[1] and tonumber(current[3] or '1') or 0
for i = 1, old - 1 do redis.call('DEL', KEYS[1] .. '#' .. i) end
local arg = 5
for c = 0, count - 1 do
  local key = (c == 0) and KEYS[1] or KEYS[2 + c]
  local n = tonumber(ARGV[arg])
  arg = arg + 1
  redis.call('DEL', key)
  redis.call('HSET', key, 'version', ARGV[1])
  for i = arg, arg + n - 1, 256 do
    redis.call('HSET', key, unpack(ARGV, i, math.min(i + 255, arg + n - 1)))
  end
  arg = arg + n
end
if marker[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

# Delete one document. KEYS[1] chunk 0's key, KEYS[2] the marker's key; ARGV[1]
# version, ARGV[2] partition, ARGV[3] offset, ARGV[4] source, ARGV[5] the marker's
# lifetime (ms). Returns 1 deleted, 3 nothing was there (the marker is written
# all the same), 2 duplicate (this delete was applied already), 0 stale.
_DELETE_SCRIPT = "#!lua\n" + _ORDER + """
local v, p, o = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local current = redis.call('HMGET', KEYS[1], 'version', 'source', 'chunks')
if current[1] then
  local c = compare(v, o, p, order(current[1], current[2]))
  if c < 0 then return 0 end
  if c == 0 then return 2 end
end
local marker = redis.call('HMGET', KEYS[2], 'version', 'source')
if marker[1] then
  local c = compare(v, o, p, order(marker[1], marker[2]))
  if c < 0 then return 0 end
  if c == 0 then return 2 end
end
local old = current[1] and tonumber(current[3] or '1') or 0
if old > 0 then redis.call('DEL', KEYS[1]) end
for i = 1, old - 1 do redis.call('DEL', KEYS[1] .. '#' .. i) end
redis.call('HSET', KEYS[2], 'version', ARGV[1], 'source', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return old > 0 and 1 or 3
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


# Metadata field names that may be indexed: plain identifiers, so they need no
# escaping in queries.
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
FIELD_TYPES = ("tag", "numeric")


def metadata_schema(manifest: Manifest, settings: RedisSettings) -> dict[str, str]:
    """Metadata fields indexed for ``manifest``'s model: name -> ``tag`` | ``numeric``.

    The manifest's ``extra["metadata_schema"]`` first, then ``settings.metadata_schema``
    (deployment config wins). Raises :class:`ConfigError` on a bad name or type.
    """
    raw = manifest.extra.get("metadata_schema") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"model {manifest.name}: extra.metadata_schema must be an object")
    schema = {**raw, **settings.metadata_schema}
    for name, kind in schema.items():
        if not FIELD_NAME.match(name):
            raise ConfigError(f"model {manifest.name}: cannot index metadata field {name!r}")
        if kind not in FIELD_TYPES:
            raise ConfigError(
                f"model {manifest.name}: metadata field {name!r} has type {kind!r}; "
                f"use one of {FIELD_TYPES}"
            )
    return dict(sorted(schema.items()))


def connect(settings: RedisSettings, *, quick: bool = False, retries: bool = True) -> Client:
    """A client for ``settings.redis_url``; the password field overrides the URL's. A
    :class:`~redis.cluster.RedisCluster` when the server is a cluster node (see
    :mod:`embedstream.sinks.cluster`).

    ``quick``: one-second timeouts and no retries, for health checks.
    ``retries=False``: redis-py retries nothing, for callers that retry
    themselves (the worker's sink), so two retry loops never stack.
    """
    kwargs = _client_options(settings, quick=quick, retries=retries)
    single = redis.Redis.from_url(settings.redis_url, **kwargs)
    if not _is_cluster_url(settings, single):
        return single
    single.close()
    return RedisCluster.from_url(settings.redis_url, **kwargs)


def _client_options(settings: RedisSettings, *, quick: bool, retries: bool) -> dict[str, Any]:
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
    return kwargs


STARTUP_BACKOFF = Backoff(initial_s=0.5, max_s=10.0)
"""How often a starting worker asks again for a store or broker that does not answer."""

# Errors that say the store is not there (yet), not that a request was wrong:
# refused or timed-out connections, and LOADING (BusyLoadingError is a ConnectionError).
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)


def wait_until_answering(settings: RedisSettings) -> float:
    """Block until Redis answers a PING (up and done loading its data set); return the
    seconds waited.

    A worker starts before a restarted Redis does (a pod rescheduled, a compose stack
    coming up, a restart mid-outage): it waits (:func:`embedstream.retry.retry`, a
    warning per try) instead of exiting. Exiting would be read as a configuration error
    (a pool does not restart those) and would take the cluster question
    (:func:`connect`) from a server that cannot answer it. Authentication and other
    refusals are not waited for: they raise :class:`SinkError`.
    """
    where = _redacted(settings.redis_url)

    def ping() -> None:
        client = redis.Redis.from_url(settings.redis_url,
                                      **_client_options(settings, quick=True, retries=False))
        try:
            client.ping()
        except redis.AuthenticationError as err:  # a ConnectionError too, but no outage
            raise SinkError(f"Redis at {where} refused to authenticate: {err}") from err
        except UNREACHABLE as err:
            raise StoreUnavailable(f"Redis at {where} does not answer yet ({err})") from err
        except redis.RedisError as err:
            raise SinkError(f"Redis at {where}: {err}") from err
        finally:
            client.close()

    started = time.monotonic()
    retry(ping, transient=(StoreUnavailable,), backoff=STARTUP_BACKOFF,
          cancel=threading.Event(),
          on_retry=lambda err, delay: log.warning("%s: trying again in %.1fs", err, delay))
    return time.monotonic() - started


def _redacted(url: str) -> str:
    """``url`` without its password."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def _is_cluster_url(settings: RedisSettings, client: redis.Redis) -> bool:
    if settings.redis_cluster != "auto":
        return settings.redis_cluster == "yes"
    try:
        return cluster.cluster_enabled(client)
    except redis.RedisError as err:
        log.warning("cannot ask Redis whether it is a cluster (%s): taken as one server; set "
                    "EMBEDSTREAM_REDIS_CLUSTER=yes or no to skip the question", err)
        return False


def has_search(client: Client) -> bool:
    """True when the server offers FT.* commands (vector search)."""
    try:
        cluster.any_node(client).execute_command("FT._LIST")
    except redis.ResponseError:
        return False
    return True


class RedisSink:
    """See :class:`~embedstream.sinks.base.Sink`."""

    WRITES_VECTOR_TYPES: tuple[str, ...] = ("FLOAT32",)
    """Vector types :meth:`write` stores; :meth:`prepare` refuses an index of another."""

    def __init__(self, settings: RedisSettings, client: Client | None = None) -> None:
        self._client = client if client is not None else connect(settings, retries=False)
        # In a cluster: a document's keys are hash-tagged (one slot), a batch goes as one
        # pipeline per master, all sent at once.
        self._tagged = cluster.is_cluster(self._client)
        self._senders: ThreadPoolExecutor | None = None
        self._prefix = settings.key_prefix
        self._create_index = settings.create_index
        self._store_text = settings.store_text
        self._write_script = self._client.register_script(_WRITE_SCRIPT)
        self._delete_script = self._client.register_script(_DELETE_SCRIPT)
        self._retention_ms = settings.tombstone_retention_s * 1000
        # A separate client for health checks: short timeouts, no retries, so a
        # readiness probe answers at once while Redis is away.
        self._health: Client = connect(settings, quick=True) if client is None else client
        self._last_ping: tuple[float, bool] = (-1.0, True)
        self._settings = settings
        self.search_enabled = False
        self.index_configs: dict[str, IndexConfig] = {}
        """Model name -> the configuration its index has (after :meth:`prepare`); writes
        must store vectors in its ``vector_type``."""

    @property
    def tagged(self) -> bool:
        """Whether keys carry the document id as a hash tag (a cluster; see layout)."""
        return self._tagged

    def prepare(self, models: list[Manifest]) -> None:
        try:
            self.search_enabled = self._create_index and has_search(self._client)
            if not self.search_enabled:
                log.warning("Redis has no search module: vectors are stored but not indexed")
                return
            mode = cluster.search_mode(self._client, self._settings.redis_cluster_search)
            if mode != "single":
                log.info("Redis Cluster of %d masters, search by %s", len(cluster.masters(
                    self._client)), mode)  # type: ignore[arg-type]
            for manifest in models:
                for client, name in cluster.index_targets(self._client, self._prefix,
                                                          manifest.name, mode):
                    self._ensure_index(manifest, client, name)
        except redis.AuthenticationError as err:  # a ConnectionError, but not an outage
            raise SinkError(f"cannot prepare Redis indexes: {err}") from err
        except UNREACHABLE as err:
            raise StoreUnavailable(f"cannot prepare Redis indexes: {err}") from err
        except redis.RedisError as err:
            raise SinkError(f"cannot prepare Redis indexes: {err}") from err

    def _ensure_index(self, manifest: Manifest, client: redis.Redis, name: str) -> None:
        search = client.ft(name)
        schema = metadata_schema(manifest, self._settings)
        # Index settings (algorithm, graph, vector type): see embedstream.sinks.index.
        wanted = vector_index.index_config(manifest, self._settings)
        try:
            info = search.info()
        except redis.ResponseError:
            info = None
        if info is not None:
            have = vector_index.check_existing(
                client, name, manifest, wanted, info,
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
                    *_SYSTEM_FIELDS,
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
        """Index fields added since the index was made (metadata fields declared since,
        the document fields of chunking): FT.ALTER; the server re-indexes the existing
        hashes in the background."""
        wanted = [*_SYSTEM_FIELDS, *(_metadata_field(f, k) for f, k in schema.items())]
        for field in wanted:
            if field.name not in existing:
                search.alter_schema_add([field])
                log.info("index %s: added field %s", name, field.name)

    def write(self, results: list[Embedded]) -> WriteOutcome:
        """Store ``results`` (documents) in one pipelined round trip.

        Documents the server (or the client's encoder) refuses for their own data
        come back in ``WriteOutcome.rejected``; everything else is stored. Raises
        :class:`StoreFull` or :class:`SinkError` for failures about the server: then
        any part of the batch may be stored, and a retry of the whole batch is safe
        (those documents come back as duplicates).
        """
        now = time.time()
        encoder = self._client.get_encoder()
        batch = _Batch(self._client)
        rejected: list[Rejected] = []
        for index, result in enumerate(results):
            try:
                keys, args = self._write_call(result, now)
                encoded = [encoder.encode(a) for a in args]
            except (redis.DataError, UnicodeError, ValueError, TypeError) as err:
                rejected.append(Rejected(index, f"cannot encode a field: {err}"))
                continue
            self._write_script(keys=keys, args=encoded, client=batch.pipe(keys[0], index))
        replies = self._execute(batch, rejected, len(results))
        codes = [code for _, code in replies]
        return WriteOutcome(
            stored=codes.count(1), duplicates=codes.count(2),
            rejected=tuple(sorted(rejected, key=lambda r: r.index)),
            stale_at=tuple(index for index, code in replies if code == 0),
        )

    def delete(self, deletions: list[Deletion]) -> DeleteOutcome:
        """Delete documents in one pipelined round trip (see :class:`Sink`)."""
        batch = _Batch(self._client)
        for index, item in enumerate(deletions):
            event, record = item.event, item.event.record
            key = result_key(self._prefix, item.model.name, event.id, tenant=event.tenant,
                             tagged=self._tagged)
            self._delete_script(
                keys=[key, tombstone_key(self._prefix, item.model.name, event.id, event.tenant,
                                         tagged=self._tagged)],
                args=[event.version, max(0, record.partition), max(0, record.offset),
                      f"{record.topic}:{record.partition}:{record.offset}", self._retention_ms],
                client=batch.pipe(key, index),
            )
        rejected: list[Rejected] = []
        codes = [code for _, code in self._execute(batch, rejected, len(deletions))]
        if rejected:  # a delete touches only our own keys: a refusal is about the store
            raise SinkError(f"Redis refused a delete: {rejected[0].detail}")
        return DeleteOutcome(deleted=codes.count(1), absent=codes.count(3),
                             stale=codes.count(0), duplicates=codes.count(2))

    def _execute(self, batch: _Batch, rejected: list[Rejected],
                 size: int) -> list[tuple[int, int]]:
        """Run the batch's pipelines (one per master, all at once): (item index, reply
        code) of the calls that worked; per-item refusals appended to ``rejected``; failures
        about the server raised (in a cluster, after re-reading the slot map: a slot may
        have moved)."""
        if not batch.pipes:
            return []
        try:
            answered = self._send(batch)
        except (redis.RedisError, RedisClusterException) as err:
            self._refresh_slots()
            raise self._failure(err, size) from err
        codes: list[tuple[int, int]] = []
        for index, reply in answered:
            if not isinstance(reply, Exception):
                codes.append((index, int(reply)))
            elif classify(reply) == "item":
                rejected.append(Rejected(index, f"Redis refused the write: {reply}"))
            else:
                self._refresh_slots()
                raise self._failure(reply, size) from reply
        return codes

    def _send(self, batch: _Batch) -> list[tuple[int, Any]]:
        """(item index, reply) of every call of the batch."""
        pipes = list(batch.pipes.values())
        if len(pipes) == 1:
            replies = [pipes[0][0].execute(raise_on_error=False)]
        else:
            if self._senders is None:
                self._senders = ThreadPoolExecutor(max_workers=len(pipes),
                                                   thread_name_prefix="redis-shard")
            futures = [self._senders.submit(p.execute, raise_on_error=False) for p, _ in pipes]
            replies = [f.result() for f in futures]
        return [pair for (_, sent), got in zip(pipes, replies, strict=True)
                for pair in zip(sent, got, strict=True)]

    def _refresh_slots(self) -> None:
        if isinstance(self._client, RedisCluster):
            with contextlib.suppress(redis.RedisError):
                self._client.nodes_manager.initialize()

    def _write_call(self, result: Embedded, now: float) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the write script for one document."""
        event = result.event
        record = event.record
        name = result.model.name
        parts = result.parts()
        tenant, tagged = event.tenant, self._tagged
        keys = [result_key(self._prefix, name, event.id, tenant=tenant, tagged=tagged),
                tombstone_key(self._prefix, name, event.id, tenant, tagged=tagged),
                *(result_key(self._prefix, name, event.id, c.index, tenant, tagged=tagged)
                  for c in parts[1:])]
        common: dict[str, Any] = {
            "id": event.id,
            "model": name,
            "modality": result.model.modality,
            "dim": result.model.dimension,
            "created_at": now,
            "event_ts": record.timestamp_ms,
            "source": f"{record.topic}:{record.partition}:{record.offset}",
            "chunks": len(parts),
        }
        if tenant is not None:
            common[TENANT_FIELD] = tenant
        if event.metadata:
            common["metadata"] = json.dumps(event.metadata, ensure_ascii=False,
                                            separators=(",", ":"))
            for field, value in flat_metadata(event.metadata).items():
                common[meta_field(field)] = value
        args: list[Any] = [event.version, max(0, record.partition), max(0, record.offset),
                           len(parts)]
        for chunk in parts:
            fields = dict(common)
            fields.update(chunk=chunk.index,
                          embedding=chunk.vector.astype("<f4", copy=False).tobytes())
            if event.text is not None:
                fields.update(start=chunk.start, end=chunk.end)
                if self._store_text:
                    fields["text"] = event.text[chunk.start:chunk.end]
            if chunk.tokens is not None:
                fields["token_embeddings"] = chunk.tokens.astype("<f4", copy=False).tobytes()
                fields["token_count"] = int(chunk.tokens.shape[0])
            args.append(2 * len(fields))
            for field, value in fields.items():
                args.extend((field, value))
        return keys, args

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
                if isinstance(self._health, RedisCluster):  # every master must answer
                    ok = all(cluster.node_client(self._health, node).ping()
                             for node in cluster.masters(self._health))
                else:
                    ok = bool(self._health.ping())
            except redis.RedisError:
                ok = False
            self._last_ping = (now, ok)
        return self._last_ping[1]

    def close(self) -> None:
        if self._senders is not None:
            self._senders.shutdown(wait=True)
        self._client.close()
        self._health.close()


class _Batch:
    """Pipelines of one batch: one for a single server, one per master of a cluster
    (a script call goes to the master of its first key's slot)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.pipes: dict[str, tuple[Any, list[int]]] = {}
        """node name -> (its pipeline, the item index of each call in it)"""

    def pipe(self, key: str, index: int) -> Any:
        if isinstance(self._client, RedisCluster):
            node = cluster.node_of_key(self._client, key)
            name = node.name
        else:
            name = ""
        if name not in self.pipes:
            target = (cluster.node_client(self._client, node)  # type: ignore[arg-type]
                      if name else self._client)
            self.pipes[name] = (target.pipeline(transaction=False), [])
        pipe, sent = self.pipes[name]
        sent.append(index)
        return pipe


# Index attributes every model's index has besides the vector and the metadata fields.
# An index made before one of them existed gets it by FT.ALTER at the next start
# (_add_fields): the tenant tag came that way, and hashes stored before it have no
# tenant, which is what they are.
_SYSTEM_FIELDS: tuple[TagField | NumericField, ...] = (
    TagField("model"), TagField("modality"), NumericField("created_at"), TagField("id"),
    NumericField("chunk"), TagField(TENANT_FIELD),
)


def _metadata_field(name: str, kind: str) -> TagField | NumericField:
    field = meta_field(name)
    return TagField(field) if kind == "tag" else NumericField(field)


def _index_attributes(info: dict[Any, Any]) -> set[str]:
    """The attribute names of an index, from FT.INFO."""
    names = set()
    for attribute in info.get("attributes", []):
        values = [v.decode() if isinstance(v, bytes) else v for v in attribute]
        pairs = dict(zip(values[::2], values[1::2], strict=False))
        names.add(str(pairs.get("attribute") or pairs.get("identifier")))
    return names
