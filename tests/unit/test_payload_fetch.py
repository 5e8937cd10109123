"""Claim-check fetches: protocol failures are the event's ``uri_unreachable``, never a crash;
the host is resolved once and the connection goes to that very address."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from embedstream.errors import EnvelopeError
from embedstream.payloads.fetch import FetchLimits, fetch_http, parse_uri

RESPONSES = {
    "/truncated": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly-a-little",
    "/bad-status": b"NOT-HTTP garbage\r\n\r\n",
    "/bad-chunks": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n",
    "/ok": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "/loop": b"HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n",
}


@pytest.fixture
def raw_server() -> Iterator[int]:
    """A TCP server answering each request path with the raw bytes of RESPONSES."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                request = conn.recv(4096).decode("latin-1")
                path = request.split(" ")[1] if " " in request else "/"
                conn.sendall(RESPONSES.get(path, b"HTTP/1.1 404 Not Found\r\n\r\n"))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    server.close()


def limits(**overrides) -> FetchLimits:
    values = {"roots": (), "hosts": frozenset({"files.test"}), "max_bytes": 1 << 20,
              "timeout_s": 5.0, "allow_private": True, **overrides}
    return FetchLimits(**values)


@pytest.fixture
def resolve_to_loopback(monkeypatch) -> list[str]:
    """files.test resolves to 127.0.0.1 first, then (a rebinding attacker) elsewhere."""
    calls: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != "files.test":
            return real(host, port, *args, **kwargs)
        calls.append(host)
        address = "127.0.0.1" if len(calls) == 1 else "10.66.66.66"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


@pytest.mark.parametrize("path", ["/truncated", "/bad-status", "/bad-chunks", "/loop"])
def test_protocol_failures_are_uri_unreachable(raw_server, resolve_to_loopback, path):
    with pytest.raises(EnvelopeError) as caught:
        fetch_http(parse_uri(f"http://files.test:{raw_server}{path}")[1], limits())
    assert caught.value.reason == "uri_unreachable"


def test_the_host_is_resolved_once_and_that_address_is_used(raw_server, resolve_to_loopback):
    body = fetch_http(parse_uri(f"http://files.test:{raw_server}/ok")[1], limits())
    assert body == b"hello"
    assert resolve_to_loopback == ["files.test"]  # checked and connected with one answer


def test_a_host_resolving_to_a_private_address_is_refused_before_connecting(resolve_to_loopback):
    with pytest.raises(EnvelopeError) as caught:
        fetch_http(parse_uri("http://files.test:9/ok")[1], limits(allow_private=False))
    assert caught.value.reason == "uri_forbidden"
