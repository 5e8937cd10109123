"""Redis Cluster: whether a client talks to one, its masters, and where indexes live.

A cluster is found by asking the server (``INFO cluster``), so the same
``EMBEDSTREAM_REDIS_URL`` naming any node works (``settings.redis_cluster``
skips the question). Two ways to search one:

* ``coordinator``: the query engine's coordinator (Redis 8, RSCoordinator)
  spreads one ``FT.CREATE`` over every shard and merges one ``FT.SEARCH``.
  Its shards answer ``_FT.SEARCH``, which is how ``auto`` recognises it.
* ``shards``: no coordinator (the embedded Valkey + ``redisearch.so``). The
  module treats an index name as a key, so ``FT.CREATE`` is redirected
  (``MOVED``) to the master owning the name's slot. Each master therefore gets
  an index named ``<prefix>:idx:<model>{<tag>}`` with a tag whose slot it
  owns; it indexes the master's own keys, and a search asks every master and
  merges their top k (:func:`index_targets`). The names follow the slot map
  when the index is made: after resharding, restart the workers so the new
  owners get theirs (keys moved with a slot are re-indexed by their new node's
  index once it exists).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from embedstream.errors import SinkError
from embedstream.sinks.layout import index_name

log = logging.getLogger(__name__)

Client = redis.Redis | RedisCluster
"""What :func:`embedstream.sinks.redis.connect` returns."""

SearchMode = Literal["single", "coordinator", "shards"]

_TAG_LIMIT = 1_000_000  # tags tried per master; a master owning any slot finds one in ~16k


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def cluster_enabled(client: redis.Redis) -> bool:
    """Whether the server ``client`` talks to runs in cluster mode (``INFO cluster``)."""
    info = client.info("cluster")
    return bool(int(info.get("cluster_enabled", 0)))


def masters(client: RedisCluster) -> list[ClusterNode]:
    """The cluster's masters, in a stable order (by address)."""
    return sorted(client.get_primaries(), key=lambda node: node.name)


def node_client(client: RedisCluster, node: ClusterNode) -> redis.Redis:
    """A plain client of one node (its commands are not routed by slot)."""
    connection = client.get_redis_connection(node)
    if connection is None:  # not connected yet: redis-py makes them lazily
        client.nodes_manager.initialize()
        connection = client.get_redis_connection(node)
    return connection


def node_of_key(client: RedisCluster, key: str) -> ClusterNode:
    """The master serving ``key``'s slot (from the client's slot map)."""
    return client.nodes_manager.get_node_from_slot(key_slot(key.encode()))


def any_node(client: Client) -> redis.Redis:
    """A plain client to run unrouted commands on (``FT._LIST``, ``COMMAND INFO``)."""
    if isinstance(client, RedisCluster):
        return node_client(client, masters(client)[0])
    return client


def search_mode(client: Client, wanted: str = "auto") -> SearchMode:
    """``single`` (one server), or for a cluster ``coordinator`` / ``shards`` (see module
    docstring); ``wanted`` is ``settings.redis_cluster_search``."""
    if not isinstance(client, RedisCluster):
        return "single"
    if wanted in ("coordinator", "shards"):
        return wanted  # type: ignore[return-value]
    try:  # without arguments: "wrong number of arguments" where the command exists
        any_node(client).execute_command("_FT.SEARCH")
    except redis.ResponseError as err:
        return "shards" if "unknown command" in str(err).lower() else "coordinator"
    return "coordinator"


def shard_index_name(client: RedisCluster, node: ClusterNode, prefix: str, model: str) -> str:
    """The index name of ``model`` on master ``node``: hash-tagged with a tag whose slot
    ``node`` owns (the first such of ``0``, ``1``, ...), so ``FT.CREATE`` stays there."""
    base = index_name(prefix, model)
    slots = client.nodes_manager.slots_cache
    for n in range(_TAG_LIMIT):
        owners = slots.get(key_slot(str(n).encode()))
        if owners and owners[0].name == node.name:
            return f"{base}{{{n}}}"
    raise SinkError(f"master {node.name} owns no slot: it cannot hold an index")


def index_targets(client: Client, prefix: str, model: str, mode: SearchMode,
                  ) -> list[tuple[redis.Redis, str]]:
    """Where ``model``'s index lives: (client, index name) per index to create or ask."""
    if not isinstance(client, RedisCluster):
        return [(client, index_name(prefix, model))]
    if mode == "coordinator":
        return [(any_node(client), index_name(prefix, model))]
    return [(node_client(client, node), shard_index_name(client, node, prefix, model))
            for node in masters(client)]
