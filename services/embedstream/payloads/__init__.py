"""Binary payloads: the bytes of an image or audio event, wherever they travel.

Three forms, one result (:meth:`PayloadResolver.resolve` returns the file's
bytes or raises :class:`~embedstream.errors.EnvelopeError` with a reason):

* inline: ``"data"`` is the file, base64 (``invalid_base64``,
  ``payload_too_large`` past ``payload_max_inline_bytes``);
* raw bytes: the record value is the file (headers carry id and model);
* claim check: ``"uri"`` names the file; fetchers are chosen by scheme
  through :data:`embedstream.payloads.fetch.FETCHERS` (``file://`` under
  ``uri_roots``, ``http(s)://`` to ``uri_allowed_hosts``), with
  ``fetch_max_bytes`` and ``fetch_timeout_s`` limits (``uri_forbidden``,
  ``uri_unreachable``, ``payload_too_large``).
"""

from embedstream.payloads.resolve import PayloadResolver

__all__ = ["PayloadResolver"]
