"""Who may call the gateway: API keys with scopes and tenants, rate limits, exposure.

A request names its key in ``X-API-Key: <key>`` or ``Authorization: Bearer
<key>``. Keys come from ``Settings.gateway_api_keys`` and the keys file
(re-read when it changes), one a line::

    # <key or salted hash>   [scopes=ingest,search,admin] [tenant=T] [rate=R] [burst=B] [name=N]
    3q2-7c...                 scopes=ingest,search tenant=acme rate=20 name=acme-app
    sha256$9f1c...$5be0...    scopes=admin name=ops

A key is given as itself or as ``sha256$<salt hex>$<sha256(salt + key) hex>``
(``embedstream api-key`` makes both), so a Secret need not hold the plain
keys. A line without ``scopes=`` has every scope (keys files from before
scopes keep working; a warning names them). ``tenant=`` binds the key to a
tenant: what it ingests is stamped with it and everything it reads or deletes
is that tenant's alone (see :mod:`embedstream.gateway.app`).

Routes declare what they need with a dependency, so a route cannot be left
open by forgetting: ``dependencies=[require("search")]`` (one scope),
``[require()]`` (any valid key) or ``[PUBLIC]`` (no key). :func:`check_routes`
refuses an app with a route that declares none, and :func:`document_scopes`
names each operation's scope in the OpenAPI spec (``x-embedstream-scope``),
which the authorisation matrix test reads. Answers: no key or an unknown one
401, a key without the scope 403, a key over its rate 429 with ``Retry-After``.

With no keys every request is the anonymous principal (every scope, no
tenant): fine on loopback, refused on any other address unless
``gateway_allow_anonymous`` (:func:`check_exposure`). Keys are compared in
constant time and never logged; metrics count by scope and outcome only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Security, routing
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from embedstream.envelope import TENANT_PATTERN
from embedstream.errors import ConfigError, GatewayError, RateLimited
from embedstream.metrics import GatewayMetrics
from embedstream.sections import GatewaySettings

log = logging.getLogger(__name__)

SCOPES = ("ingest", "search", "admin")
"""ingest: publish events. search: search, read stored vectors, embed. admin:
delete items, replays, rollouts."""
ANY = "any"
"""A route any valid key may call (whatever its scopes)."""
PUBLIC_SCOPE = "public"
"""A route that needs no key (health, metrics, the page)."""
SCOPE_EXTENSION = "x-embedstream-scope"
HASH_SCHEME = "sha256"

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="An API key (README: Gateway security).")
bearer = HTTPBearer(auto_error=False, description="The same API key as a bearer token.")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: a key's grants (never the key itself)."""

    name: str
    """The key's ``name=``, else ``key-<line>``: for logs, never for metric labels."""
    scopes: frozenset[str]
    tenant: str | None = None
    rate: float | None = None
    """Requests per second (None: ``gateway_rate_limit``; 0: no limit)."""
    burst: int | None = None
    identity: str = ""
    """Stable across reloads (a digest of the key's line), so a key keeps its bucket."""

    def may(self, scope: str) -> bool:
        return scope == ANY or scope in self.scopes


ANONYMOUS = Principal("anonymous", frozenset(SCOPES), identity="anonymous")


@dataclass(frozen=True, slots=True)
class KeyEntry:
    principal: Principal
    salt: bytes
    digest: bytes
    """sha256(salt + key): plain keys are hashed on load with an empty salt, so every
    comparison has one length and one cost."""
    implicit_scopes: bool = False

    def matches(self, offered: bytes) -> bool:
        return hmac.compare_digest(hashlib.sha256(self.salt + offered).digest(), self.digest)


def hash_key(key: str, salt: bytes | None = None) -> str:
    """The keys-file form of ``key`` that does not reveal it: ``sha256$<salt>$<digest>``.

    A fast hash is enough for keys made by ``embedstream api-key`` (256 random
    bits); a short, guessable key is not protected by any hash.
    """
    salt = secrets.token_bytes(16) if salt is None else salt
    return f"{HASH_SCHEME}${salt.hex()}${hashlib.sha256(salt + key.encode('utf-8')).hexdigest()}"


def new_key() -> str:
    """A fresh random API key (256 bits, URL-safe)."""
    return "es_" + secrets.token_urlsafe(32)


def parse_line(line: str, where: str, number: int = 1) -> KeyEntry:
    """One keys-file line -> its entry. Errors name ``where``, never the key."""
    tokens = line.split()
    secret, options = tokens[0], tokens[1:]
    fields: dict[str, str] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or name not in ("scopes", "tenant", "rate", "burst", "name") or name in fields:
            raise ConfigError(f"{where}: {option.split('=')[0]!r} is not an option (give "
                              "scopes=, tenant=, rate=, burst=, name= once each after the key)")
        fields[name] = value
    scopes = _scopes(fields.get("scopes"), where)
    tenant = fields.get("tenant")
    if tenant is not None and not TENANT_PATTERN.match(tenant):
        raise ConfigError(f"{where}: tenant {tenant!r} is not a tenant name (a letter, then up "
                          "to 63 letters, digits or '_.-')")
    salt, digest = _digest(secret, where)
    principal = Principal(
        name=fields.get("name") or f"key-{number}",
        scopes=scopes or frozenset(SCOPES), tenant=tenant,
        rate=_number(fields, "rate", float, where), burst=_number(fields, "burst", int, where),
        identity=hashlib.sha256(digest + line.encode("utf-8")).hexdigest()[:16],
    )
    return KeyEntry(principal, salt, digest, implicit_scopes=scopes is None)


def _scopes(raw: str | None, where: str) -> frozenset[str] | None:
    if raw is None:
        return None
    scopes = frozenset(s for s in raw.split(",") if s)
    unknown = scopes - set(SCOPES)
    if unknown or not scopes:
        raise ConfigError(f"{where}: scopes are {', '.join(SCOPES)}; got {raw!r}")
    return scopes


def _number(fields: dict[str, str], name: str, kind: type[Any], where: str) -> Any:
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < (0 if name == "rate" else 1):
        raise ConfigError(f"{where}: {name}={raw!r} is not a valid {name}")
    return value


def _digest(secret: str, where: str) -> tuple[bytes, bytes]:
    if not secret.startswith(HASH_SCHEME + "$"):
        return b"", hashlib.sha256(secret.encode("utf-8")).digest()
    parts = secret.split("$")
    try:
        salt, digest = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except (IndexError, ValueError) as err:
        raise ConfigError(f"{where}: a hashed key is sha256$<salt hex>$<digest hex>") from err
    if len(parts) != 3 or len(digest) != 32:
        raise ConfigError(f"{where}: a hashed key is sha256$<salt hex>$<64 hex digits>")
    return salt, digest


def parse_keys(lines: Sequence[str], source: str) -> list[KeyEntry]:
    """Every key of ``lines`` (blank lines and ``#`` comments skipped)."""
    entries = []
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            entries.append(parse_line(line.strip(), f"{source} line {number}", number))
    return entries


class KeyStore:
    """The keys in force: the settings' list plus the keys file, re-read when it changes.

    A changed file that does not parse, or that ``validate`` refuses, leaves the
    keys in force as they were (logged as an error, once per change).
    """

    def __init__(self, settings: GatewaySettings,
                 validate: Callable[[list[KeyEntry]], None] = lambda _: None) -> None:
        listed = [k.get_secret_value() for k in settings.gateway_api_keys]
        self._static = parse_keys(listed, "gateway_api_keys entry")
        self._file: Path | None = settings.gateway_api_keys_file
        self._every_s = settings.gateway_api_keys_reload_s
        self._validate = validate
        self._lock = threading.Lock()
        self._content: bytes | None = None
        self._checked = time.monotonic()
        self._entries = self._static + self._read_file()
        validate(self._entries)

    def _read_file(self) -> list[KeyEntry]:
        if self._file is None:
            return []
        try:
            content = self._file.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read the API keys file {self._file}: {err}") from err
        self._content = content
        return parse_keys(content.decode("utf-8", "replace").splitlines(), str(self._file))

    def entries(self) -> list[KeyEntry]:
        self._maybe_reload()
        return self._entries

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._file is None or now - self._checked < self._every_s:
            return
        with self._lock:
            if now - self._checked < self._every_s:
                return
            self._checked = now
            previous = self._content
            try:
                entries = self._static + self._read_file()
            except ConfigError as err:
                if self._content != previous:
                    log.error("API keys not reloaded, the keys in force stay: %s", err)
                return
            if self._content == previous:
                return
            try:
                self._validate(entries)
            except ConfigError as err:
                log.error("API keys not reloaded, the keys in force stay: %s", err)
                return
            self._entries = entries
            log.info("API keys reloaded from %s: %d keys", self._file, len(entries))


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; a request takes one."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one will be there."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class Authenticator:
    """Admits requests: the key (401), its scope (403), its rate (429). One per app."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics | None = None) -> None:
        self._settings = settings
        self.metrics = metrics
        self._started = False
        self.store = KeyStore(settings, self._validate)
        self._started = True
        self._buckets: dict[tuple[str, float, int], TokenBucket] = {}
        self._lock = threading.Lock()
        for entry in self.store.entries():
            if entry.implicit_scopes:
                log.warning("API key %s has no scopes= and so every scope; give it only the "
                            "scopes it needs (%s)", entry.principal.name, ",".join(SCOPES))

    def _validate(self, entries: list[KeyEntry]) -> None:
        tenants = sorted({e.principal.tenant for e in entries if e.principal.tenant})
        if tenants and self._settings.tenant_from == "none":
            raise ConfigError(
                f"keys are bound to tenants ({', '.join(tenants)}) but tenant_from is 'none': "
                "the workers would refuse their events. Set EMBEDSTREAM_TENANT_FROM=header on "
                "the gateway and the workers.")
        if not entries and self._started:
            raise ConfigError("the keys file has no keys: a gateway that runs with keys never "
                              "opens itself on a reload (restart it to run without keys)")

    @property
    def enabled(self) -> bool:
        """True when requests need a key."""
        return bool(self.store.entries())

    def authenticate(self, offered: str | None) -> Principal:
        entries = self.store.entries()
        if not entries:
            return ANONYMOUS
        if not offered:
            raise GatewayError(401, "unauthorized",
                               "an API key is required (X-API-Key or Authorization: Bearer)")
        candidate = offered.encode("utf-8", "replace")
        # compare with every key, so the time taken does not tell which one nearly matched
        found = [entry for entry in entries if entry.matches(candidate)]
        if not found:
            raise GatewayError(401, "unauthorized", "the API key is not valid")
        return found[0].principal

    def admit(self, offered: str | None, scope: str) -> Principal:
        """The request's principal, or the 401 / 403 / 429 that refuses it."""
        outcome = "unauthorized"
        try:
            principal = self.authenticate(offered)
            if not principal.may(scope):
                outcome = "forbidden"
                raise GatewayError(403, "forbidden",
                                   f"this API key lacks the '{scope}' scope (it has: "
                                   f"{', '.join(sorted(principal.scopes))})")
            wait = self._bucket(principal).take() if self._limited(principal) else 0.0
            if wait > 0:
                outcome = "rate_limited"
                raise RateLimited(f"this API key is over its rate of "
                                  f"{self._rate(principal):g} requests/s", wait)
            outcome = "allowed"
            return principal
        finally:
            if self.metrics is not None:
                self.metrics.auth.labels(scope, outcome).inc()

    def _rate(self, principal: Principal) -> float:
        return self._settings.gateway_rate_limit if principal.rate is None else principal.rate

    def _limited(self, principal: Principal) -> bool:
        return self._rate(principal) > 0

    def _bucket(self, principal: Principal) -> TokenBucket:
        rate = self._rate(principal)
        burst = principal.burst or self._settings.gateway_rate_burst or max(1, math.ceil(2 * rate))
        key = (principal.identity, rate, burst)
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) > 4 * len(self.store.entries()) + 16:
                    self._buckets.clear()  # keys were reloaded many times: forget old buckets
                bucket = self._buckets[key] = TokenBucket(rate, burst)
            return bucket


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: GatewaySettings, auth: Authenticator) -> None:
    """Refuse to serve a non-loopback address without keys unless anonymous is allowed
    (:class:`ConfigError` saying how to fix it); warn when it is."""
    if auth.enabled or is_loopback(settings.gateway_host):
        return
    if not settings.gateway_allow_anonymous:
        raise ConfigError(
            f"the gateway would let anyone who reaches {settings.gateway_host}:"
            f"{settings.gateway_port} publish, read and delete: no API keys are configured. "
            "Give keys (--api-keys-file FILE or EMBEDSTREAM_GATEWAY_API_KEYS_FILE; "
            "`embedstream api-key` makes one), bind a loopback address (--host 127.0.0.1), "
            "or pass --allow-anonymous (EMBEDSTREAM_GATEWAY_ALLOW_ANONYMOUS=true) to serve "
            "without keys on purpose.")
    log.warning("the gateway serves %s WITHOUT API KEYS (--allow-anonymous): anyone who "
                "reaches it may publish, read and delete", settings.gateway_host)


# ------------------------------------------------------------ route declarations
class ScopeCheck:
    """The dependency behind :func:`require`: admits the request or raises."""

    def __init__(self, scope: str) -> None:
        if scope not in (*SCOPES, ANY):
            raise ValueError(f"unknown scope {scope!r}; scopes: {SCOPES} or {ANY!r}")
        self.scope = scope

    async def __call__(
        self,
        request: Request,
        api_key: Annotated[str | None, Security(api_key_header)],
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> Principal:
        auth: Authenticator = request.app.state.auth
        offered = api_key or (credentials.credentials if credentials else None)
        principal = auth.admit(offered, self.scope)
        request.state.principal = principal
        return principal


def require(scope: str = ANY) -> Any:
    """The dependency a route (or router) declares: the request needs ``scope``
    (``ANY``: just a valid key). The handler reads :func:`principal_of`."""
    return Depends(ScopeCheck(scope))


def _public() -> None:
    """Marks a route that needs no key."""


PUBLIC = Depends(_public)


def principal_of(request: Request) -> Principal:
    """Who the request is (set by the route's :func:`require`)."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal):
        raise RuntimeError(f"{request.url.path}: the route declares no require(scope)")
    return principal


def _api_routes(app: FastAPI) -> list[Any]:
    """Every API route of ``app`` with its effective dependencies (those of the
    routers it was included through too)."""
    contexts = getattr(routing, "iter_route_contexts", None)  # FastAPI >= 0.13x: lazy routers
    if contexts is None:
        return [r for r in app.routes if isinstance(r, APIRoute)]
    return [c for c in contexts(app.routes) if isinstance(c.original_route, APIRoute)]


def route_scope(route: Any) -> str | None:
    """The scope a route declares (``public`` for :data:`PUBLIC`), or None."""
    for dependency in route.dependencies:
        call = dependency.dependency
        if isinstance(call, ScopeCheck):
            return call.scope
        if call is _public:
            return PUBLIC_SCOPE
    return None


def check_routes(app: FastAPI) -> None:
    """Refuse an app with a route that declares neither a scope nor :data:`PUBLIC`."""
    for route in _api_routes(app):
        if route_scope(route) is None:
            raise ConfigError(
                f"route {','.join(sorted(route.methods or ()))} {route.path} declares no scope: "
                "give it dependencies=[require('<scope>')] or [PUBLIC] (embedstream.gateway.auth)")


def document_scopes(app: FastAPI) -> None:
    """Name each operation's scope in the OpenAPI spec (``x-embedstream-scope``)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        spec = build()
        for route in _api_routes(app):
            if not route.include_in_schema:
                continue
            for method in route.methods or ():
                operation = spec.get("paths", {}).get(route.path_format, {}).get(method.lower())
                if operation is not None:
                    operation[SCOPE_EXTENSION] = route_scope(route)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
