"""Whether a server answers: a Kafka Metadata request, a Redis PING, a free port.

Each probe returns a detail for ``embedstream dev status`` or raises
:class:`NotReady`; none logs or retries (they run in tight start-up loops).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

PROBE_TIMEOUT_S = 1.0  # one readiness probe; servers on loopback answer in milliseconds


class NotReady(Exception):
    """A probe got no (valid) answer yet."""


def probe_kafka(host: str, port: int) -> str:
    """Send one Kafka Metadata (v0) request; return the advertised broker.

    A hand-written request rather than a kafka-python client: it answers in
    milliseconds, fails fast while the port is closed and logs nothing.
    """
    client_id = b"embedstream-devstack"
    correlation_id = 0x0E5D
    request = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id
    request += struct.pack(">i", 0)  # v0: an empty topic list asks for all topics
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            size = struct.unpack(">i", _recv_exact(sock, 4))[0]
            body = _recv_exact(sock, min(size, 1 << 16))
        got_id, n_brokers = struct.unpack_from(">ii", body)
        if got_id != correlation_id or n_brokers < 1:
            raise NotReady(f"unexpected metadata answer from {host}:{port}")
        node_id, host_len = struct.unpack_from(">ih", body, 8)
        adv_host = body[14 : 14 + host_len].decode()
        (adv_port,) = struct.unpack_from(">i", body, 14 + host_len)
    except (OSError, struct.error, UnicodeDecodeError) as err:
        raise NotReady(f"no Kafka answer from {host}:{port}: {err}") from err
    return f"answering; advertises {adv_host}:{adv_port} (node {node_id})"


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-answer")
        data += chunk
    return data


def probe_redis(host: str, port: int) -> tuple[str, bool | None]:
    """PING Redis and list its modules; return a detail and whether search is loaded."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        # No retries: redis-py retries timeouts by default, turning one probe into 15 s.
        with redis.Redis(host=host, port=port, socket_timeout=PROBE_TIMEOUT_S,
                         socket_connect_timeout=PROBE_TIMEOUT_S,
                         retry=Retry(NoBackoff(), 0)) as client:
            client.ping()
            modules = client.module_list()
            clustered = int(client.info("cluster").get("cluster_enabled", 0))
            cluster = cluster_info(client) if clustered else {}
    except redis.RedisError as err:
        raise NotReady(f"no Redis answer from {host}:{port}: {err}") from err
    names = {m.get(b"name", m.get("name")) for m in modules}
    search = bool(names & {b"search", "search"})
    detail = ("answering; search module loaded" if search
              else "answering; NO search module (vector search off)")
    if cluster:
        detail += (f"; cluster node, cluster {cluster.get('cluster_state')}, "
                   f"{cluster.get('cluster_size')} masters")
    return detail, search


def cluster_info(client: Any) -> dict[str, str]:
    raw = client.execute_command("CLUSTER", "INFO")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.split("\r\n") if ":" in line)


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (same SO_REUSEADDR as servers)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
