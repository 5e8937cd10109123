"""The embedded development stack: real Tansu and valkey processes, no mocks.

Unit tests (no servers) cover the config, the pid-file trust rules and the
failure reporting with stand-in processes; integration tests start the real
binaries. The lifecycle tests run their own stack, apart from the session
``stack`` fixture, since they stop and restart it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from redis.commands.search.query import Query

from embedstream.devstack import (
    DevStackConfig,
    DevStackError,
    down,
    embedded_stack,
    free_port,
    probes,
    processes,
    servers,
    status,
    up,
)
from embedstream.devstack import stack as stack_module

# --------------------------------------------------------------------------- helpers


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A foreign program listening on a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


@pytest.fixture
def own_cfg(tmp_path: Path) -> Iterator[DevStackConfig]:
    """A private stack config; whatever a test leaves running is stopped afterwards."""
    cfg = DevStackConfig.on_free_ports(tmp_path / "state", start_timeout_s=10)
    yield cfg
    down(cfg, timeout_s=5)


def _pid_gone(pid: int) -> bool:
    return not processes.alive(pid)


def _fake_service(tmp_path: Path, name: str, code: str, answers: bool) -> processes.Service:
    """A stand-in server: a Python one-liner and a probe that answers or not."""

    def probe() -> tuple[str, bool | None]:
        if not answers:
            raise probes.NotReady("no answer")
        return "answering", None

    return processes.Service(
        name=name, host="127.0.0.1", port=1, binary=Path(sys.executable),
        argv=(sys.executable, "-c", code), pid_file=tmp_path / f"{name}.pid",
        log_file=tmp_path / f"{name}.log", probe=probe,
    )


# --------------------------------------------------------------------------- unit


def test_config_addresses() -> None:
    cfg = DevStackConfig(broker_port=19092, redis_host="localhost", redis_port=16379)
    assert cfg.bootstrap == "127.0.0.1:19092"
    assert cfg.redis_url == "redis://localhost:16379/0"


def test_free_ports_are_distinct_and_bindable(tmp_path: Path) -> None:
    cfg = DevStackConfig.on_free_ports(tmp_path)
    assert cfg.broker_port != cfg.redis_port
    for port in (cfg.broker_port, cfg.redis_port, free_port()):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_status_and_down_of_a_stack_never_started(tmp_path: Path) -> None:
    cfg = DevStackConfig.on_free_ports(tmp_path / "never")
    down(cfg)  # no state dir: a no-op
    st = status(cfg)
    assert not st.ok
    assert not st.broker.running and st.broker.pid is None
    assert st.redis.detail == "not running"
    text = st.format()
    assert "broker" in text and cfg.bootstrap in text and "stopped" in text


def test_status_points_at_a_foreign_listener(tmp_path: Path, listening: socket.socket) -> None:
    cfg = DevStackConfig(broker_port=listening.getsockname()[1], state_dir=tmp_path,
                         redis_port=free_port())
    assert "in use by another process" in status(cfg).broker.detail


@pytest.mark.parametrize("service", ["broker", "redis"])
def test_up_refuses_a_port_in_use(tmp_path: Path, listening: socket.socket, service: str) -> None:
    cfg = DevStackConfig.on_free_ports(tmp_path)
    port = listening.getsockname()[1]
    cfg = replace(cfg, **{f"{service}_port": port})
    with pytest.raises(DevStackError, match=rf"{service} cannot start: 127.0.0.1:{port} .*in use"):
        up(cfg)
    assert not list(tmp_path.glob("*.pid"))  # nothing was started


def test_up_refuses_one_address_for_both(tmp_path: Path) -> None:
    with pytest.raises(DevStackError, match="share one address"):
        up(DevStackConfig(broker_port=6400, redis_port=6400, state_dir=tmp_path))


def test_a_pid_file_naming_another_program_is_not_trusted(tmp_path: Path) -> None:
    cfg = DevStackConfig.on_free_ports(tmp_path)
    broker_bin = servers.broker_binary()
    # Our own pid, recorded as the broker: alive, but the wrong binary.
    processes.write_pid_file(tmp_path / "broker.pid", processes.PidRecord(
        os.getpid(), str(broker_bin), "127.0.0.1", cfg.broker_port, None))
    # A dead pid.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    processes.write_pid_file(tmp_path / "redis.pid", processes.PidRecord(
        dead.pid, str(broker_bin), "127.0.0.1", cfg.redis_port, None))

    st = status(cfg)
    assert st.broker.pid is None and "stale pid file" in st.broker.detail
    assert st.redis.pid is None
    down(cfg)  # must not signal this test process
    assert not list(tmp_path.glob("*.pid"))


def test_process_identity_uses_the_executable() -> None:
    assert processes.runs_binary(os.getpid(), Path(sys.executable))
    assert not processes.runs_binary(os.getpid(), servers.broker_binary())


def test_a_server_that_dies_stops_the_others_and_quotes_its_log(tmp_path: Path) -> None:
    good = _fake_service(tmp_path, "good", "import time; time.sleep(60)", answers=True)
    bad = _fake_service(
        tmp_path, "bad", "print('\\x1b[31mERROR\\x1b[0m bind: Address in use'); raise SystemExit(0)",
        answers=False,
    )
    ours_before = set(processes.children)
    with pytest.raises(DevStackError) as info:
        processes.start_all([good, bad], timeout_s=10)
    message = str(info.value)
    assert message.startswith("bad (127.0.0.1:1) exited during start-up")
    assert str(bad.log_file) in message
    assert "ERROR bind: Address in use" in message  # colour codes stripped
    assert not list(tmp_path.glob("*.pid"))
    assert set(processes.children) <= ours_before  # the good one was stopped and reaped


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    mute = _fake_service(tmp_path, "mute", "import time; time.sleep(60)", answers=False)
    ours_before = set(processes.children)
    started = time.monotonic()
    with pytest.raises(DevStackError, match=r"mute .* did not answer on 127.0.0.1:1 within 0.5s"):
        processes.start_all([mute], timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert set(processes.children) <= ours_before


# --------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_session_stack_round_trips_events_and_vectors(stack: DevStackConfig, unique: str) -> None:
    st = status(stack)
    assert st.ok and st.search, st.format()

    admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap)
    try:
        admin.create_topics([NewTopic(unique, num_partitions=2, replication_factor=1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap)
    producer.send(unique, key=b"k", value=b"hello", partition=1).get(timeout=10)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=stack.bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=10_000)
    consumer.assign([TopicPartition(unique, 1)])
    try:
        record = next(iter(consumer))
    finally:
        consumer.close()
    assert (record.key, record.value) == (b"k", b"hello")

    client = redis.Redis.from_url(stack.redis_url)
    index = f"{unique}:idx"
    client.execute_command(
        "FT.CREATE", index, "ON", "HASH", "PREFIX", "1", f"{unique}:", "SCHEMA",
        "v", "VECTOR", "HNSW", "6", "TYPE", "FLOAT32", "DIM", "3", "DISTANCE_METRIC", "COSINE",
    )
    for name, vec in {"x": (1, 0, 0), "y": (0, 1, 0), "xy": (1, 1, 0)}.items():
        client.hset(f"{unique}:{name}", mapping={"v": struct.pack("<3f", *vec)})
    query = Query("*=>[KNN 2 @v $q AS d]").sort_by("d").return_fields("d").dialect(2)
    hits = client.ft(index).search(query, query_params={"q": struct.pack("<3f", 0.9, 0.1, 0)})
    assert [doc.id for doc in hits.docs] == [f"{unique}:x", f"{unique}:xy"]
    client.execute_command("FT.DROPINDEX", index, "DD")
    client.close()


@pytest.mark.integration
def test_lifecycle_up_status_down_is_idempotent(own_cfg: DevStackConfig) -> None:
    first = up(own_cfg)
    assert first.ok and first.search, first.format()
    assert first.broker.address == own_cfg.bootstrap
    pids = (first.broker.pid, first.redis.pid)
    assert None not in pids

    again = up(own_cfg)  # already running: left as is
    assert (again.broker.pid, again.redis.pid) == pids

    other_port = replace(own_cfg, broker_port=free_port())
    with pytest.raises(DevStackError, match="already runs on"):
        up(other_port)

    down(own_cfg)
    stopped = status(own_cfg)
    assert not stopped.broker.running and not stopped.redis.running
    assert stopped.broker.pid is None and stopped.redis.pid is None
    assert all(_pid_gone(pid) for pid in pids if pid is not None)
    assert not list(own_cfg.state_dir.glob("*.pid"))
    down(own_cfg)  # idempotent

    restarted = up(own_cfg)  # ports are free again right away
    assert restarted.ok
    assert (restarted.broker.pid, restarted.redis.pid) != pids


@pytest.mark.integration
def test_embedded_stack_leaves_a_stack_it_did_not_start(own_cfg: DevStackConfig) -> None:
    with embedded_stack(own_cfg) as running:
        assert running.status().ok
        assert running.bootstrap == own_cfg.bootstrap
    assert not status(own_cfg).broker.running  # it started it: stopped

    pids = up(own_cfg)
    with embedded_stack(own_cfg):
        pass
    after = status(own_cfg)
    assert after.ok and after.redis.pid == pids.redis.pid  # already up: left running


@pytest.mark.integration
def test_up_reports_a_running_server_that_hangs(own_cfg: DevStackConfig) -> None:
    pid = up(own_cfg).redis.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(DevStackError, match=rf"redis \(pid {pid}\) runs but does not answer"):
            up(own_cfg)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert up(own_cfg).ok


@pytest.mark.integration
def test_down_kills_a_server_that_ignores_sigterm(own_cfg: DevStackConfig) -> None:
    pid = up(own_cfg).redis.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a stopped process does not act on SIGTERM
    started = time.monotonic()
    down(own_cfg, timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert _pid_gone(pid)


@pytest.mark.integration
@pytest.mark.parametrize("service", ["broker", "redis"])
def test_a_real_server_losing_the_port_race_fails_with_its_log(
    own_cfg: DevStackConfig, listening: socket.socket, service: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The port is taken between the pre-check and the bind: the server itself fails.
    monkeypatch.setattr(stack_module, "port_free", lambda host, port: True)
    port = listening.getsockname()[1]
    cfg = replace(own_cfg, **{f"{service}_port": port})
    with pytest.raises(DevStackError) as info:
        up(cfg)
    message = str(info.value)
    assert message.startswith(f"{service} (127.0.0.1:{port}) exited during start-up")
    assert f"{service}.log" in message
    assert "in use" in message  # Tansu: "Address in use"; valkey: "Address already in use"
    assert not status(cfg).ok and not list(cfg.state_dir.glob("*.pid"))


@pytest.mark.integration
def test_redis_runs_without_the_search_module(
    own_cfg: DevStackConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(servers, "search_module_path", lambda: None)
    with caplog.at_level(logging.WARNING, logger="embedstream.devstack"):
        st = up(own_cfg)
    assert st.ok and not st.search
    assert "NO search module" in st.redis.detail
    assert "vector search" in caplog.text
