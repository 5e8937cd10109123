"""The embedded development stack: a Kafka-API broker and Redis with search, on loopback.

``embedstream dev up | down | status``, the demo, the bench and the test suite
run two local servers (or a broker and a Redis Cluster) as detached background
processes. The package, by role:

- :mod:`.config`: where they listen and keep their state; what ``status`` reports
- :mod:`.servers`: the binaries, how each server starts, forming a Redis Cluster
- :mod:`.probes`: whether a server answers (Kafka Metadata, Redis PING), a free port
- :mod:`.processes`: detached processes, pid files, recognising and stopping them
- :mod:`.stack`: ``up``, ``down``, ``status`` and ``embedded_stack`` (a context manager)

The servers are for development only: no authentication, no persistence.
"""

from embedstream.devstack.config import (
    BROKER,
    REDIS,
    DevStackConfig,
    ServiceStatus,
    StackStatus,
    free_port,
)
from embedstream.devstack.servers import redis_binary, search_module_path
from embedstream.devstack.stack import RunningStack, down, embedded_stack, status, up
from embedstream.errors import DevStackError

__all__ = [
    "BROKER", "REDIS", "DevStackConfig", "DevStackError", "RunningStack", "ServiceStatus",
    "StackStatus", "down", "embedded_stack", "free_port", "redis_binary", "search_module_path",
    "status", "up",
]
