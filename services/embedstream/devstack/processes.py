"""The servers as detached processes: start, recognise, stop.

A pid file is the only record of what runs; its pid is trusted only while that
process is alive, was created when the pid file says (a reused pid is someone
else) and runs the expected binary, so a stale pid file never gets an unrelated
process killed. Processes are read through ``psutil``, not ``/proc`` by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from embedstream.devstack.probes import NotReady
from embedstream.errors import DevStackError

logger = logging.getLogger("embedstream.devstack")

POLL_S = 0.05  # interval of readiness and exit polls
_LOG_TAIL_LINES = 12
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Processes this Python process started, kept so that stopping them also reaps
# them (a child that exits stays a zombie, "alive" to kill(0), until waited for).
children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Service:
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


def created(pid: int) -> float | None:
    """When process ``pid`` was created (seconds since the epoch), to tell a reused pid
    apart; None when it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _reap(pid: int) -> None:
    """Collect the exit status of a child of ours, so it stops being a zombie."""
    child = children.get(pid)
    if child is not None:
        if child.poll() is not None:
            del children[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (zombies count as dead)."""
    _reap(pid)
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # exists, owned by someone else; the identity check rejects it


def runs_binary(pid: int, binary: Path) -> bool:
    """Whether process ``pid`` runs ``binary`` (its executable or its argv[0])."""
    target = binary.resolve()
    try:
        process = psutil.Process(pid)
    except psutil.Error:
        return False
    with contextlib.suppress(psutil.Error, OSError):
        exe = process.exe().removesuffix(" (deleted)")
        if exe and Path(exe).resolve() == target:
            return True
    try:
        argv = process.cmdline()
        argv0 = argv[0] if argv else process.name()
    except psutil.Error:
        return False
    # valkey rewrites its cmdline to "valkey-server host:port", so compare names only.
    return bool(argv0) and Path(argv0.split()[0]).name == target.name


@dataclass(frozen=True)
class PidRecord:
    pid: int
    binary: str
    host: str
    port: int
    created: float | None


def read_pid_file(path: Path) -> PidRecord | None:
    try:
        data = json.loads(path.read_text())
        return PidRecord(int(data["pid"]), str(data["binary"]), str(data["host"]),
                         int(data["port"]), data.get("created"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("ignoring unreadable pid file %s", path)
        return None


def write_pid_file(path: Path, record: PidRecord) -> None:
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(json.dumps(asdict(record)))
    tmp.replace(path)


def live_record(path: Path) -> PidRecord | None:
    """The pid file's record if its process is alive and is the recorded server."""
    record = read_pid_file(path)
    if record is None or not alive(record.pid):
        return None
    now = created(record.pid)
    if None not in (now, record.created) and abs(now - record.created) > 0.01:  # type: ignore[operator]
        return None  # the pid was reused by a newer process
    return record if runs_binary(record.pid, Path(record.binary)) else None


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    kept = [_ANSI.sub("", line) for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:]) or "(empty log)"


def spawn(svc: Service) -> int:
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
    children[proc.pid] = proc
    write_pid_file(svc.pid_file, PidRecord(proc.pid, str(svc.binary), svc.host, svc.port,
                                            created(proc.pid)))
    logger.info("started %s on %s (pid %d, log %s)", svc.name, svc.address, proc.pid,
                svc.log_file)
    return proc.pid


def stop(pids: Collection[int], timeout_s: float) -> None:
    """SIGTERM the processes, SIGKILL those still alive after ``timeout_s``, wait for all."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(POLL_S)
        stubborn = [p for p in pids if alive(p)]
        if not stubborn:
            return
        if sig is signal.SIGTERM:
            logger.warning("pids %s ignored SIGTERM for %.0fs; killing", stubborn, timeout_s)
            for pid in stubborn:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    raise DevStackError(f"processes {stubborn} survived SIGKILL")


def start_all(services: Sequence[Service], timeout_s: float) -> None:
    """Spawn every service and wait until each answers.

    All or nothing: when one dies, or does not answer within ``timeout_s``, every
    process this call started is stopped and :class:`DevStackError` names the
    failed service, its log file and the last lines of its log.
    """
    started: dict[int, Service] = {}
    try:
        for svc in services:
            started[spawn(svc)] = svc
        deadline = time.monotonic() + timeout_s
        pending = dict(started)
        while pending:
            for pid, svc in list(pending.items()):
                if not alive(pid):
                    raise _start_error(svc, "exited during start-up")
                with contextlib.suppress(NotReady):
                    svc.probe()
                    del pending[pid]
            if pending and time.monotonic() > deadline:
                svc = next(iter(pending.values()))
                raise _start_error(svc, f"did not answer on {svc.address} within {timeout_s:g}s")
            if pending:
                time.sleep(POLL_S)
        for pid, svc in started.items():  # an answer from a foreign server on the port
            if not alive(pid):
                raise _start_error(svc, "exited right after start-up")
    except BaseException:
        stop(list(started), timeout_s=5.0)
        for svc in started.values():
            svc.pid_file.unlink(missing_ok=True)
        raise


def _start_error(svc: Service, what: str) -> DevStackError:
    return DevStackError(
        f"{svc.name} ({svc.address}) {what}. Log {svc.log_file}, last lines:\n"
        f"{log_tail(svc.log_file)}"
    )
