"""Where the development stack listens and keeps its state, and what ``status`` reports."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedstream.errors import DevStackError

BROKER = "broker"
REDIS = "redis"


@dataclass(frozen=True)
class DevStackConfig:
    """Where the development stack listens and keeps its state.

    ``state_dir`` holds the pid files, logs and data directory; two stacks need
    two state directories. ``start_timeout_s`` bounds how long :func:`up` waits
    for both servers to answer.
    """

    broker_host: str = "127.0.0.1"
    broker_port: int = 9092
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    state_dir: Path = Path(".devstack")
    start_timeout_s: float = 20.0
    redis_cluster: tuple[tuple[int, int], ...] = ()
    """``()``: one Redis server. Otherwise a Redis Cluster of one master per entry,
    ``(port, cluster bus port)``; the first port is ``redis_port``."""

    def __post_init__(self) -> None:
        if self.redis_cluster and self.redis_cluster[0][0] != self.redis_port:
            raise DevStackError("the cluster's first node must listen on redis_port")

    @property
    def redis_shards(self) -> int:
        return max(1, len(self.redis_cluster))

    @classmethod
    def with_shards(cls, shards: int, **kwargs: Any) -> DevStackConfig:
        """A config whose Redis is ``shards`` masters on ``redis_port``, ``+1``, ... (bus
        ports 10000 above, Redis's convention); ``shards`` 1: one plain server."""
        if shards < 1:
            raise DevStackError(f"--redis-shards must be at least 1, got {shards}")
        port = int(kwargs.get("redis_port", cls.redis_port))
        nodes = tuple((port + i, port + 10000 + i) for i in range(shards)) if shards > 1 else ()
        return cls(redis_cluster=nodes, **kwargs)

    @property
    def bootstrap(self) -> str:
        """Kafka bootstrap servers, ``host:port``."""
        return f"{self.broker_host}:{self.broker_port}"

    @property
    def redis_url(self) -> str:
        """Redis URL of database 0."""
        return f"redis://{self.redis_host}:{self.redis_port}/0"

    @classmethod
    def on_free_ports(cls, state_dir: Path, start_timeout_s: float = 20.0,
                      redis_shards: int = 1) -> DevStackConfig:
        """A config on distinct free loopback ports (for tests and demos); ``redis_shards``
        above 1: a Redis Cluster of that many masters."""
        broker_port, *redis_ports = free_ports(1 + (2 * redis_shards if redis_shards > 1 else 1))
        nodes = tuple(zip(redis_ports[::2], redis_ports[1::2], strict=True)) if (
            redis_shards > 1) else ()
        return cls(broker_port=broker_port, redis_port=redis_ports[0], state_dir=state_dir,
                   start_timeout_s=start_timeout_s, redis_cluster=nodes)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS may reuse it)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    # Hold every socket until all are chosen, so the ports are distinct.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@dataclass(frozen=True)
class ServiceStatus:
    """The state of one service.

    ``running`` means the recorded process is alive, runs the expected binary and
    answers its protocol. ``search`` is whether Redis has the search module
    loaded (``None`` for the broker, or when Redis does not answer).
    """

    name: str
    address: str
    pid: int | None
    running: bool
    log_file: Path
    detail: str
    search: bool | None = None

    def format(self) -> str:
        state = "running" if self.running else "stopped"
        pid = f"pid {self.pid}" if self.pid is not None else "no pid"
        head = f"{self.name:<7}{state:<9}{self.address:<22}{pid:<11}"
        return f"{head}{self.detail} (log: {self.log_file})"


@dataclass(frozen=True)
class StackStatus:
    """The state of the broker and Redis."""

    broker: ServiceStatus
    redis: ServiceStatus

    @property
    def ok(self) -> bool:
        """Both services run and answer."""
        return self.broker.running and self.redis.running

    @property
    def search(self) -> bool:
        """Redis answers and has the search module (vector indexes work)."""
        return bool(self.redis.search)

    def format(self) -> str:
        """A few human-readable lines for the CLI."""
        return f"{self.broker.format()}\n{self.redis.format()}"
