"""Claim-check fetchers, one per URI scheme, chosen through :data:`FETCHERS`.

Each takes the parsed URI and the limits and returns the bytes, or raises
:class:`~embedstream.errors.EnvelopeError`: ``uri_forbidden`` for what
configuration does not allow (a path outside ``uri_roots``, a host not in
``uri_allowed_hosts``, a redirect elsewhere), ``uri_unreachable`` for what
is allowed but failed, ``payload_too_large`` past ``fetch_max_bytes``.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedstream.errors import EnvelopeError

_CHUNK = 1 << 16


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


def _check_host(uri: urllib.parse.SplitResult, limits: FetchLimits) -> None:
    """Raise ``uri_forbidden`` unless the host is allowed and, where it resolves to a
    non-public address (loopback, private, link-local, ...), private ones are allowed."""
    if not _host_allowed(uri, limits.hosts):
        raise EnvelopeError("uri_forbidden", f"host {uri.hostname!r} is not in uri_allowed_hosts")
    if limits.allow_private:
        return
    try:
        infos = socket.getaddrinfo(uri.hostname or "", uri.port or 443, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as err:
        raise EnvelopeError("uri_unreachable", f"cannot resolve {uri.hostname!r}: {err}") from err
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not address.is_global:
            raise EnvelopeError(
                "uri_forbidden",
                f"{uri.hostname!r} resolves to non-public address {address} "
                "(set uri_allow_private_networks to allow it)",
            )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to an allowed host (and address)."""

    def __init__(self, limits: FetchLimits) -> None:
        self.limits = limits

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Any:
        target = urllib.parse.urlsplit(newurl)
        if not _host_allowed(target, self.limits.hosts):
            raise EnvelopeError("uri_forbidden", f"redirect to a host not allowed: {newurl}")
        _check_host(target, self.limits)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_http(uri: urllib.parse.SplitResult, limits: FetchLimits) -> bytes:
    """GET from an allowed host, at most ``max_bytes`` within ``timeout_s`` in all."""
    _check_host(uri, limits)
    opener = urllib.request.build_opener(_CheckedRedirects(limits))
    deadline = time.monotonic() + limits.timeout_s
    chunks: list[bytes] = []
    size = 0
    try:
        with opener.open(urllib.parse.urlunsplit(uri), timeout=limits.timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                raise EnvelopeError(
                    "payload_too_large", f"{declared} bytes declared, limit {limits.max_bytes}"
                )
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > limits.max_bytes:
                    raise EnvelopeError("payload_too_large", f"body over {limits.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise EnvelopeError("uri_unreachable", f"fetch over {limits.timeout_s}s")
                chunks.append(chunk)
    except EnvelopeError:
        raise
    except urllib.error.HTTPError as err:
        raise EnvelopeError("uri_unreachable", f"HTTP {err.code} from {uri.hostname}") from err
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise EnvelopeError("uri_unreachable", f"cannot fetch from {uri.hostname}: {err}") from err
    return b"".join(chunks)


Fetcher = Callable[[urllib.parse.SplitResult, FetchLimits], bytes]
FETCHERS: dict[str, Fetcher] = {"file": fetch_file, "http": fetch_http, "https": fetch_http}
