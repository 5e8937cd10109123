"""Broker reachability for readiness: a real listening socket, and a closed port."""

import socket

from embedstream.sources.common import reachable as _reachable


def test_reachable_only_while_something_listens():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    assert _reachable(f"127.0.0.1:{port}")
    listener.close()
    assert not _reachable(f"127.0.0.1:{port}")
    assert not _reachable("not a server")
