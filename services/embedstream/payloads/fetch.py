"""Claim-check fetchers, one per URI scheme, chosen through :data:`FETCHERS`.

Each takes the parsed URI and the limits and returns the bytes, or raises
:class:`~embedstream.errors.EnvelopeError`: ``uri_forbidden`` for what
configuration does not allow (a path outside ``uri_roots``, a host not in
``uri_allowed_hosts``, a redirect elsewhere), ``uri_unreachable`` for what
is allowed but failed (any network or protocol error: refused, reset, a
truncated or malformed response), ``payload_too_large`` past
``fetch_max_bytes``. Never another exception: a fetch runs in the worker's
pre stage, per event.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from embedstream.errors import EnvelopeError

_CHUNK = 1 << 16
_MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True, slots=True)
class FetchLimits:
    roots: tuple[Path, ...]
    hosts: frozenset[str]
    max_bytes: int
    timeout_s: float
    # Loopback, private, link-local and other non-public addresses are refused
    # unless this is set, even for an allowed host name (no SSRF via DNS).
    allow_private: bool = False


def parse_uri(uri: str) -> tuple[str, urllib.parse.SplitResult]:
    try:
        parsed = urllib.parse.urlsplit(uri)
    except ValueError as err:
        raise EnvelopeError("invalid_field", f"'uri' is not a URI: {err}") from err
    return parsed.scheme.lower(), parsed


def fetch_file(uri: urllib.parse.SplitResult, limits: FetchLimits) -> bytes:
    """A file under one of ``limits.roots``; symlinks and ``..`` are resolved first."""
    if uri.netloc not in ("", "localhost"):
        raise EnvelopeError("uri_forbidden", f"file URI names host {uri.netloc!r}")
    if not limits.roots:
        raise EnvelopeError("uri_forbidden", "file:// URIs are off (no uri_roots configured)")
    path = Path(urllib.parse.unquote(uri.path)).resolve()
    if not any(path.is_relative_to(root) for root in limits.roots):
        raise EnvelopeError("uri_forbidden", f"{path} is outside the configured uri_roots")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise EnvelopeError("uri_unreachable", f"{path} is not a regular file")
        if size > limits.max_bytes:
            raise EnvelopeError(
                "payload_too_large", f"{path} is {size} bytes, limit {limits.max_bytes}"
            )
        with path.open("rb") as fh:
            data = fh.read(limits.max_bytes + 1)
    except OSError as err:
        raise EnvelopeError("uri_unreachable", f"cannot read {path}: {err.strerror}") from err
    if len(data) > limits.max_bytes:
        raise EnvelopeError("payload_too_large", f"{path} grew past {limits.max_bytes} bytes")
    return data


def _host_allowed(uri: urllib.parse.SplitResult, hosts: frozenset[str]) -> bool:
    host = (uri.hostname or "").lower()
    return host in hosts or (uri.port is not None and f"{host}:{uri.port}" in hosts)


def _address(uri: urllib.parse.SplitResult, limits: FetchLimits) -> str:
    """The one address the fetch connects to, resolved once (no DNS-rebinding gap
    between the check and the connection).

    Raises ``uri_forbidden`` unless the host is allowed and, unless private
    networks are, every address it resolves to is public (not loopback, private,
    link-local, ...).
    """
    if not _host_allowed(uri, limits.hosts):
        raise EnvelopeError("uri_forbidden", f"host {uri.hostname!r} is not in uri_allowed_hosts")
    try:
        infos = socket.getaddrinfo(uri.hostname or "", uri.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, ValueError) as err:
        raise EnvelopeError("uri_unreachable", f"cannot resolve {uri.hostname!r}: {err}") from err
    addresses = [str(info[4][0]).split("%", 1)[0] for info in infos]
    if not limits.allow_private:
        for address in addresses:
            if not ipaddress.ip_address(address).is_global:
                raise EnvelopeError(
                    "uri_forbidden",
                    f"{uri.hostname!r} resolves to non-public address {address} "
                    "(set uri_allow_private_networks to allow it)",
                )
    if not addresses:
        raise EnvelopeError("uri_unreachable", f"{uri.hostname!r} resolves to no address")
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """Talks to ``host`` (Host header) at an address resolved beforehand."""

    def __init__(self, host: str, port: int | None, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to an address resolved beforehand, verified against ``host`` (SNI, certificate)."""

    def __init__(self, host: str, port: int | None, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def fetch_http(uri: urllib.parse.SplitResult, limits: FetchLimits) -> bytes:
    """GET from an allowed host, at most ``max_bytes`` within ``timeout_s`` in all,
    following up to a few redirects to allowed hosts."""
    deadline = time.monotonic() + limits.timeout_s
    for _hop in range(_MAX_REDIRECTS + 1):
        location = None
        try:
            body, location = _get(uri, _address(uri, limits), limits, deadline)
        except EnvelopeError:
            raise
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise EnvelopeError("uri_unreachable",
                                f"cannot fetch from {uri.hostname}: {type(err).__name__}: {err}") from err
        if location is None:
            return body
        target = urllib.parse.urlsplit(urllib.parse.urljoin(urllib.parse.urlunsplit(uri), location))
        if target.scheme.lower() not in ("http", "https") or not _host_allowed(target, limits.hosts):
            raise EnvelopeError("uri_forbidden", f"redirect to a host not allowed: {location}")
        uri = target
    raise EnvelopeError("uri_unreachable", f"more than {_MAX_REDIRECTS} redirects")


def _get(
    uri: urllib.parse.SplitResult, address: str, limits: FetchLimits, deadline: float
) -> tuple[bytes, str | None]:
    """One GET: (body, None), or (b"", location) for a redirect."""
    remaining = max(0.1, deadline - time.monotonic())
    kind = _PinnedHTTPS if uri.scheme.lower() == "https" else _PinnedHTTP
    conn = kind(uri.hostname or "", uri.port, address, remaining)
    try:
        path = urllib.parse.urlunsplit(("", "", uri.path or "/", uri.query, ""))
        conn.request("GET", path, headers={"User-Agent": "embedstream", "Accept-Encoding": "identity"})
        response = conn.getresponse()
        if response.status in _REDIRECTS and response.getheader("Location"):
            return b"", response.getheader("Location")
        if response.status != 200:
            raise EnvelopeError("uri_unreachable", f"HTTP {response.status} from {uri.hostname}")
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise EnvelopeError(
                "payload_too_large", f"{declared} bytes declared, limit {limits.max_bytes}"
            )
        chunks: list[bytes] = []
        size = 0
        while chunk := response.read(_CHUNK):
            size += len(chunk)
            if size > limits.max_bytes:
                raise EnvelopeError("payload_too_large", f"body over {limits.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise EnvelopeError("uri_unreachable", f"fetch over {limits.timeout_s}s")
            chunks.append(chunk)
        if declared and declared.isdigit() and size != int(declared):
            # http.client returns a body cut short by a closed connection without a word
            raise EnvelopeError("uri_unreachable",
                                f"truncated response: {size} of {declared} bytes")
        return b"".join(chunks), None
    finally:
        conn.close()


Fetcher = Callable[[urllib.parse.SplitResult, FetchLimits], bytes]
FETCHERS: dict[str, Fetcher] = {"file": fetch_file, "http": fetch_http, "https": fetch_http}
