"""Real servers and processes for integration tests: a Redis of one's own, worker
processes, a claim-check server that never answers, polling helpers."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from embedstream.devstack import free_port, redis_binary, search_module_path
from embedstream.settings import Settings


def wait_for(condition: Callable[[], object], timeout: float = 60.0, interval: float = 0.1) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` passes; never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


class RedisServer:
    """A Redis (Valkey + search) of its own, with an append-only file so a restart keeps
    the data; ``extra`` adds server arguments (``--maxmemory``...)."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def start(self) -> None:
        argv = [str(redis_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--appendonly", "yes", "--save", "", *self.extra]
        module = search_module_path()
        if module is not None:
            argv += ["--loadmodule", str(module)]
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        assert wait_for(lambda: pings(self.client()), 15), "Redis did not start"

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)

    def kill(self) -> None:
        """Cleanup after a failure: nothing may outlive the test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes ``embedstream worker`` run with ``settings``'s values."""
    env = {**os.environ}
    for name, value in settings.model_dump(exclude_defaults=True).items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float | Path):
            text = str(value)
        env[f"EMBEDSTREAM_{name.upper()}"] = text
    env.update(extra)
    return env


class WorkerProcess:
    """``embedstream worker`` as a child process, with its HTTP port and log file."""

    def __init__(self, settings: Settings, log: Path, **env: str) -> None:
        self.port = free_port()
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "embedstream", "worker", "--metrics-port", str(self.port),
                 "--metrics-host", "127.0.0.1"],
                env=worker_env(settings, **env), stdout=out, stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name: str) -> float:
        """The sum of a metric's samples (0 when absent or unreachable)."""
        status, body = self.get("/metrics")
        total = 0.0
        for line in body.splitlines() if status == 200 else ():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def kill(self) -> None:
        """SIGKILL: what a segfault or the OOM killer does."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(15)

    def stop(self, timeout: float = 60) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


class HangingFiles:
    """An HTTP server whose every request hangs until the test ends: a claim-check
    store that never answers. ``hits`` counts the requests; ``hit`` is set on each."""

    def __init__(self) -> None:
        self.hits = 0
        self.hit = threading.Event()
        self._release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                outer.hit.set()
                outer._release.wait(300)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def hanging_files() -> Iterator[HangingFiles]:
    server = HangingFiles()
    try:
        yield server
    finally:
        server.close()
