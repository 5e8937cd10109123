"""``up``, ``down`` and ``status`` of the whole stack, and a context manager around them.

Everything a running stack needs lives in ``DevStackConfig.state_dir``: one pid
file and one log file per service and Redis's (empty) data directory. ``up``
and ``down`` hold a lock on that folder, so two commands at once take turns.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType

from embedstream.devstack.config import BROKER, REDIS, DevStackConfig, ServiceStatus, StackStatus
from embedstream.devstack.probes import NotReady, port_free, probe_kafka, probe_redis
from embedstream.devstack.processes import Service, live_record, start_all, stop
from embedstream.devstack.servers import form_cluster, services
from embedstream.errors import DevStackError

logger = logging.getLogger("embedstream.devstack")


@contextlib.contextmanager
def _locked(cfg: DevStackConfig) -> Iterator[None]:
    """Serialise up/down on one state directory (two CLIs at once)."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    with (cfg.state_dir / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


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
        to_start = [svc for svc in services(cfg) if not _already_running(svc, cfg.state_dir)]
        for svc in to_start:
            if not port_free(svc.host, svc.port):
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
        start_all(to_start, cfg.start_timeout_s)
        if cfg.redis_cluster and nodes:
            try:
                form_cluster(cfg)
            except DevStackError:
                stop([p for p in (_live_pid(s) for s in to_start) if p is not None], 5.0)
                raise
        return [svc.name for svc in to_start]


def _live_pid(svc: Service) -> int | None:
    record = live_record(svc.pid_file)
    return record.pid if record is not None else None


def _already_running(svc: Service, state_dir: Path) -> bool:
    """Whether ``svc`` runs and answers; raise if it runs elsewhere or hangs."""
    record = live_record(svc.pid_file)
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
    except NotReady as err:
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
            record = live_record(path)
            if record is not None:
                pids[record.pid] = path.stem
            elif path.exists():
                logger.info("removing stale pid file %s", path)
        stop(pids, timeout_s)
        for path in pid_files:
            path.unlink(missing_ok=True)
        for pid, name in pids.items():
            logger.info("stopped %s (pid %d)", name, pid)


def status(cfg: DevStackConfig) -> StackStatus:
    """The state of both services; starts and stops nothing, never raises for a dead one."""
    state = cfg.state_dir.resolve()
    return StackStatus(
        broker=_service_status(BROKER, cfg.broker_host, cfg.broker_port, state,
                               lambda h, p: (probe_kafka(h, p), None)),
        redis=_service_status(REDIS, cfg.redis_host, cfg.redis_port, state, probe_redis),
    )


def _service_status(name: str, host: str, port: int, state: Path,
                    probe: Callable[[str, int], tuple[str, bool | None]]) -> ServiceStatus:
    pid_file, log_file = state / f"{name}.pid", state / f"{name}.log"
    record = live_record(pid_file)
    if record is None:
        detail = "not running (stale pid file)" if pid_file.exists() else "not running"
        if not port_free(host, port):
            detail += f"; {host}:{port} is in use by another process"
        return ServiceStatus(name, f"{host}:{port}", None, False, log_file, detail)
    address = f"{record.host}:{record.port}"
    try:
        detail, search = probe(record.host, record.port)
    except NotReady as err:
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
