"""The storage contract: which keys a document's chunks live at, and what their hashes hold.

Other tools (search, the gateway, the client, framework recipes) rely on it:

* A document's chunk 0 (and a one-chunk document) is the hash
  ``<prefix>:<model>:<id>``; chunk *n* ≥ 1 is ``<prefix>:<model>:<id>#<n>``.
  In the key, an id's ``%`` and ``#`` are written ``%25`` and ``%23``, so that
  the chunk suffix is never ambiguous (``page#1`` and chunk 1 of ``page``);
  the ``id`` field holds the id as it is.
  Every chunk's hash is covered by the model's vector index
  ``<prefix>:idx:<model>``.
* System fields: ``id`` (the document id), ``chunk`` (this chunk's index),
  ``chunks`` (their count), ``start``/``end`` (character offsets of the chunk
  in the original text), ``text`` (the chunk's own text), ``embedding``
  (float32 little-endian), ``model``, ``modality``, ``dim``, ``version``,
  ``created_at`` (unix seconds), ``event_ts`` (the record's timestamp, ms),
  ``source`` (topic:partition:offset of the record), and for token-mode models
  ``token_embeddings``/``token_count``.
* On a Redis Cluster the id part of every key of a document is a hash tag,
  ``<prefix>:<model>:{<id>}`` (chunk *n*: ``<prefix>:<model>:{<id>}#<n>``,
  marker ``<prefix>:!tomb:<model>:{<id>}``; ``{`` and ``}`` of an id written
  ``%7B`` and ``%7D``), so a document's chunks and its marker share one slot
  and one master, and its write and delete scripts run there atomically.
* The producer's metadata, whatever its names (``source``, ``model``, ``id``
  included): ``metadata`` holds it as sent (a JSON object; search results give
  it back unchanged), and each top-level field is also a hash field
  ``meta_<name>`` (strings as they are, anything else as JSON), which the
  index covers for the fields declared in ``metadata_schema``.
* A tenant's documents (events that named a tenant, see ``Settings.tenant_from``)
  live in their tenant's own id space: the key's id segment is
  ``%<tenant>:<id>`` (``%`` then a letter never occurs in an escaped id, and a
  tenant name has no ``:``), so tenants A and B may both store ``doc-1``
  without touching each other; the system field ``tenant`` holds the tenant and
  the index covers it as a tag, so searches filter by it.
* A delete leaves ``<prefix>:!tomb:<model>:<id>`` (``version``, ``source``)
  for ``tombstone_retention_s``: a replayed older write cannot bring the
  document back. (``!`` cannot occur in a model name, so no index covers it.)
"""

from __future__ import annotations

import json
from typing import Any

META_PREFIX = "meta_"
"""Hash fields of the producer's metadata: ``meta_<name>``."""
TENANT_FIELD = "tenant"
"""The system field (and index tag) of a document's tenant."""


def result_key(prefix: str, model: str, event_id: str, chunk: int = 0,
               tenant: str | None = None, *, tagged: bool = False) -> str:
    """The hash of chunk ``chunk`` of document ``event_id`` (of ``tenant``'s, if given;
    ``tagged``: in a cluster)."""
    base = f"{prefix}:{model}:{key_segment(event_id, tenant, tagged=tagged)}"
    return base if chunk == 0 else f"{base}#{chunk}"


def key_segment(event_id: str, tenant: str | None = None, *, tagged: bool = False) -> str:
    """An id as it appears in keys: ``%`` and ``#`` escaped, behind its tenant's
    ``%<tenant>:`` if it has one, and in a cluster (``tagged``) ``{``/``}`` escaped and
    the whole in braces, so all keys of one document share a slot (see the module
    docstring). ``*`` stays as it is, so a key pattern can be made of it."""
    segment = event_id
    if "%" in segment or "#" in segment:
        segment = segment.replace("%", "%25").replace("#", "%23")
    if tenant:
        segment = f"%{tenant}:{segment}"
    if not tagged:
        return segment
    return "{" + segment.replace("{", "%7B").replace("}", "%7D") + "}"


def id_of_segment(segment: str, *, tagged: bool = False) -> str:
    """The id a key segment (the part after ``<prefix>:<model>:``, chunk suffix dropped)
    was made of: the inverse of :func:`key_segment`, the tenant dropped."""
    if tagged:
        segment = segment[1:-1].replace("%7B", "{").replace("%7D", "}")
    if segment.startswith("%") and not segment.startswith(("%25", "%23")):
        segment = segment.split(":", 1)[1] if ":" in segment else segment
    return segment.replace("%23", "#").replace("%25", "%")


def index_name(prefix: str, model: str) -> str:
    return f"{prefix}:idx:{model}"


def tombstone_key(prefix: str, model: str, event_id: str, tenant: str | None = None, *,
                  tagged: bool = False) -> str:
    return f"{prefix}:!tomb:{model}:{key_segment(event_id, tenant, tagged=tagged)}"


def meta_field(name: str) -> str:
    """The hash field (and index attribute) of metadata field ``name``."""
    return f"{META_PREFIX}{name}"


def metadata_of(fields: dict[str, str]) -> dict[str, Any]:
    """A hash's metadata, as the producer sent it (``{}`` when there is none)."""
    raw = fields.get("metadata")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
