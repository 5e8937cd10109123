"""Turn an image/audio event into the bytes of its file (see :mod:`embedstream.payloads`)."""

from __future__ import annotations

import base64
import binascii
import logging

from embedstream.envelope import Event
from embedstream.errors import EnvelopeError
from embedstream.payloads.fetch import FETCHERS, FetchLimits, parse_uri
from embedstream.sections import PayloadSettings

log = logging.getLogger(__name__)


class PayloadResolver:
    """Resolves events to bytes under the limits in :class:`PayloadSettings`. Thread-safe."""

    def __init__(self, settings: PayloadSettings) -> None:
        self.max_inline = settings.payload_max_inline_bytes
        self.limits = FetchLimits(
            roots=tuple(p.resolve() for p in settings.uri_roots),
            hosts=frozenset(h.lower() for h in settings.uri_allowed_hosts),
            max_bytes=settings.fetch_max_bytes,
            timeout_s=settings.fetch_timeout_s,
            allow_private=settings.uri_allow_private_networks,
        )

    def resolve(self, event: Event) -> bytes:
        if event.raw is not None:
            return event.raw
        if event.data_b64 is not None:
            return self._inline(event.data_b64)
        if event.uri is not None:
            scheme, parsed = parse_uri(event.uri)
            fetcher = FETCHERS.get(scheme)
            if fetcher is None:
                raise EnvelopeError(
                    "uri_forbidden", f"scheme {scheme!r} is not fetched; use {sorted(FETCHERS)}"
                )
            return fetcher(parsed, self.limits)
        raise EnvelopeError("missing_data", f"event {event.id} carries no payload")

    def _inline(self, data_b64: str) -> bytes:
        # base64 is 4/3 of the bytes: reject before decoding what is surely too large.
        if len(data_b64) > (self.max_inline * 4) // 3 + 4:
            raise EnvelopeError(
                "payload_too_large", f"inline data over {self.max_inline} bytes: send a uri"
            )
        try:
            data = base64.b64decode(data_b64, validate=True)
        except (binascii.Error, ValueError) as err:
            raise EnvelopeError("invalid_base64", f"'data' is not valid base64: {err}") from err
        if len(data) > self.max_inline:
            raise EnvelopeError(
                "payload_too_large", f"inline data is {len(data)} bytes, limit {self.max_inline}"
            )
        return data
