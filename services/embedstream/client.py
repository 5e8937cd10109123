"""Python clients of the gateway's HTTP API: :class:`Client` (sync) and :class:`AsyncClient`.

>>> with Client("http://127.0.0.1:8080", api_key="...") as es:
...     ids = es.produce("text", [{"text": "The rocket reached orbit."}])
...     hits = es.search(text="rockets", k=5, filters={"lang": "en"})

Needs ``httpx`` (the ``client`` or ``gateway`` extra). Gateway errors raise
:class:`GatewayClientError` with the status and the gateway's error code; a
429 raises :class:`embedstream.errors.Backpressure` carrying ``retry_after_s``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import httpx

from embedstream.errors import Backpressure, EmbedstreamError


class GatewayClientError(EmbedstreamError):
    """The gateway refused a request: ``status`` (HTTP) and ``code`` (its error code)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One document (its best chunk), or one chunk with ``all_chunks``."""

    id: str
    score: float
    key: str
    fields: dict[str, str] = field(default_factory=dict)
    chunk: int = 0
    chunks: int = 1
    text: str | None = None
    start: int | None = None
    end: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredEmbedding:
    id: str
    model: str
    vector: list[float]
    fields: dict[str, str]
    chunk: int = 0
    chunks: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _check(response: httpx.Response) -> Any:
    if response.status_code == 429:
        retry = float(response.headers.get("Retry-After", "1"))
        raise Backpressure(response.json().get("detail", "backpressure"), retry)
    if response.status_code >= 400:
        try:
            body = response.json()
            code, detail = body.get("error", "error"), body.get("detail", response.text)
        except ValueError:
            code, detail = "error", response.text
        raise GatewayClientError(response.status_code, code, detail)
    return response.json()


def _produce_request(modality: str, events: list[dict[str, Any]] | dict[str, Any] | bytes,
                     *, id: str | None, model: str | None,
                     content_type: str | None) -> dict[str, Any]:
    url = f"/v1/events/{modality}"
    if isinstance(events, bytes):
        params = {k: v for k, v in (("id", id), ("model", model)) if v is not None}
        default = "text/plain" if modality == "text" else "application/octet-stream"
        return {"method": "POST", "url": url, "content": events, "params": params,
                "headers": {"Content-Type": content_type or default}}
    return {"method": "POST", "url": url, "json": events}


def _search_body(text: str | None, id: str | None, data: bytes | None, model: str | None,
                 k: int, filters: dict[str, Any] | None, all_chunks: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"k": k}
    if all_chunks:
        body["all_chunks"] = True
    if text is not None:
        body["text"] = text
    if id is not None:
        body["id"] = id
    if data is not None:
        body["data"] = base64.b64encode(data).decode("ascii")
    if model is not None:
        body["model"] = model
    if filters:
        body["filters"] = filters
    return body


def _hits(body: dict[str, Any]) -> list[SearchHit]:
    return [SearchHit(h["id"], h["score"], h["key"], h["fields"], h.get("chunk", 0),
                      h.get("chunks", 1), h.get("text"), h.get("start"), h.get("end"),
                      h.get("metadata") or {}) for h in body["hits"]]


def _stored(body: dict[str, Any]) -> StoredEmbedding:
    return StoredEmbedding(body["id"], body["model"], body["vector"], body["fields"],
                           body.get("chunk", 0), body.get("chunks", 1), body.get("metadata") or {})


def _delete_request(id: str, modality: str | None) -> dict[str, Any]:
    params = {"modality": modality} if modality else {}
    return {"method": "DELETE", "url": f"/v1/items/{id}", "params": params}


class Client:
    """A synchronous client; thread-safe (one connection pool). Close it, or use ``with``."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def produce(self, modality: str, events: list[dict[str, Any]] | dict[str, Any] | bytes, *,
                id: str | None = None, model: str | None = None,
                content_type: str | None = None) -> list[str]:
        """Publish envelopes (or one raw file as ``bytes``); return the event ids."""
        request = _produce_request(modality, events, id=id, model=model, content_type=content_type)
        return list(_check(self._http.request(**request))["ids"])

    def search(self, *, text: str | None = None, id: str | None = None, data: bytes | None = None,
               model: str | None = None, k: int = 10, filters: dict[str, Any] | None = None,
               all_chunks: bool = False) -> list[SearchHit]:
        """The k stored documents nearest to a text, a stored id or an image/audio file's
        bytes (each its best chunk; ``all_chunks``: the k nearest chunks)."""
        body = _search_body(text, id, data, model, k, filters, all_chunks)
        return _hits(_check(self._http.post("/v1/search", json=body)))

    def get(self, model: str, id: str, chunk: int = 0) -> StoredEmbedding:
        """The stored vector and fields of ``id`` under ``model`` (one chunk: the first)."""
        return _stored(_check(self._http.get(f"/v1/embeddings/{model}/{id}",
                                             params={"chunk": chunk} if chunk else None)))

    def delete(self, id: str, *, modality: str | None = None) -> list[str]:
        """Delete a document (every chunk, every model of ``modality``, or of all
        modalities): the gateway publishes tombstones. Returns the topics."""
        return list(_check(self._http.request(**_delete_request(id, modality)))["topics"])

    def close(self) -> None:
        self._http.close()


class AsyncClient:
    """The asyncio twin of :class:`Client` (``await es.search(...)``)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key),
                                       timeout=timeout_s)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def produce(self, modality: str, events: list[dict[str, Any]] | dict[str, Any] | bytes,
                      *, id: str | None = None, model: str | None = None,
                      content_type: str | None = None) -> list[str]:
        request = _produce_request(modality, events, id=id, model=model, content_type=content_type)
        return list(_check(await self._http.request(**request))["ids"])

    async def search(self, *, text: str | None = None, id: str | None = None,
                     data: bytes | None = None, model: str | None = None, k: int = 10,
                     filters: dict[str, Any] | None = None,
                     all_chunks: bool = False) -> list[SearchHit]:
        body = _search_body(text, id, data, model, k, filters, all_chunks)
        return _hits(_check(await self._http.post("/v1/search", json=body)))

    async def get(self, model: str, id: str, chunk: int = 0) -> StoredEmbedding:
        return _stored(_check(await self._http.get(f"/v1/embeddings/{model}/{id}",
                                                   params={"chunk": chunk} if chunk else None)))

    async def delete(self, id: str, *, modality: str | None = None) -> list[str]:
        return list(_check(await self._http.request(**_delete_request(id, modality)))["topics"])

    async def close(self) -> None:
        await self._http.aclose()
