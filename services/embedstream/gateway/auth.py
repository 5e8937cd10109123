"""Optional API-key auth: ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``.

With no keys configured every request passes. Keys are compared in constant
time and never logged. Health, metrics, the OpenAPI spec and the page's
static files are open (the page sends the key the user types).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from embedstream.errors import GatewayError

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="An API key from EMBEDSTREAM_GATEWAY_API_KEYS.")
bearer = HTTPBearer(auto_error=False, description="The same API key as a bearer token.")


class KeyCheck:
    """A FastAPI dependency that admits requests carrying one of ``keys``."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode("utf-8") for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __call__(
        self,
        api_key: Annotated[str | None, Security(api_key_header)],
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> None:
        if not self._keys:
            return
        offered = api_key or (credentials.credentials if credentials else None)
        if offered is None:
            raise GatewayError(401, "unauthorized",
                               "an API key is required (X-API-Key or Authorization: Bearer)")
        candidate = offered.encode("utf-8")
        # compare against every key, so timing does not tell which one nearly matched
        if not any([hmac.compare_digest(candidate, key) for key in self._keys]):
            raise GatewayError(401, "unauthorized", "the API key is not valid")
