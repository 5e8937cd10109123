"""The gateway's HTTP application (FastAPI): ingest, search, embeddings, health, page.

Errors are JSON ``{"error": <code>, "detail": <text>}`` with a 4xx/5xx status;
``code`` is stable (envelope reason codes for invalid events); ``/v1/embeddings``
(OpenAI-compatible) answers in OpenAI's error shape instead. Nothing of a
refused ingest request reaches Kafka: bodies are read within the size limit,
every envelope is validated, and only then is the whole request published.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedstream import __version__
from embedstream.envelope import HEADER_TENANT, MAX_ID_LENGTH, check_id
from embedstream.errors import Backpressure, EnvelopeError, GatewayError, RateLimited, SourceError
from embedstream.gateway import embeddings as openai_api
from embedstream.gateway import schemas
from embedstream.gateway.auth import (
    PUBLIC,
    Authenticator,
    Principal,
    check_exposure,
    check_routes,
    document_scopes,
    principal_of,
    require,
)
from embedstream.gateway.ingest import Limits, Upload, records_from_json, records_from_uploads
from embedstream.gateway.publisher import EventPublisher
from embedstream.gateway.query import Searcher, parse_filters
from embedstream.gateway.spec import ID_PATTERN, ingest_openapi, search_openapi
from embedstream.metrics import GATEWAY_ROUTES, GatewayMetrics
from embedstream.search import Hit, IndexMoved
from embedstream.settings import MODALITIES, Settings
from embedstream.sinks.layout import metadata_of

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorBody, "description": text}
    for status, text in (
        (400, "Malformed body (not JSON, bad filter)."),
        (401, "Missing or wrong API key."),
        (403, "The API key lacks the scope this operation needs."),
        (404, "Unknown model or stored id, or no model for the query."),
        (413, "Body, envelope or event count over the limit."),
        (415, "Content type not accepted for this modality."),
        (422, "An envelope or field is invalid (code: the envelope reason)."),
        (503, "The broker or Redis is unavailable, or search is off."),
    )
}
_RETRY: dict[int | str, dict[str, Any]] = {
    429: {"model": schemas.ErrorBody, "description": "Retry after the Retry-After seconds: the "
          "API key is over its rate (rate_limited), or backpressure (producer buffer full or "
          "broker unreachable)."}
}
_LIMITED: dict[int | str, dict[str, Any]] = {
    429: {"model": schemas.ErrorBody, "description": "The API key is over its rate: retry "
          "after the Retry-After seconds."}
}

def create_app(
    settings: Settings,
    publisher: EventPublisher,
    searcher: Searcher | None = None,
    metrics: GatewayMetrics | None = None,
    auth: Authenticator | None = None,
) -> FastAPI:
    """The gateway application over ``publisher`` (and ``searcher``; None: no search).

    Every route declares the scope it needs (:func:`~embedstream.gateway.auth.require`)
    or that it is public; an app with a route that does neither is refused, and so
    is a non-loopback ``gateway_host`` without keys (unless anonymous is allowed).
    A tenant-bound key's requests are confined to its tenant here, server-side.
    """
    metrics = metrics or GatewayMetrics()
    if auth is None:  # else the caller (run_gateway) checked it before loading models
        auth = Authenticator(settings.gateway, metrics)
        check_exposure(settings.gateway, auth)
    auth.metrics = metrics
    metrics.broker_ready.set_function(lambda: float(publisher.ready()))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            publisher.close()
            if searcher is not None:
                searcher.close()

    app = FastAPI(
        title="embedstream gateway",
        version=__version__,
        description="Ingest events over HTTP, search stored embeddings, read vectors.",
        lifespan=lifespan,
    )
    app.state.auth = auth
    _install_handlers(app, metrics)
    _add_ingest_routes(app, settings, publisher, searcher, metrics)
    _add_query_routes(app, settings, searcher, auth)
    _add_admin_routes(app, settings, publisher)
    _add_operations_routes(app, publisher, searcher, metrics)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="page-static")
    check_routes(app)
    document_scopes(app)
    return app


# ------------------------------------------------------------------ routes, by area
def _add_ingest_routes(app: FastAPI, settings: Settings, publisher: EventPublisher,
                       searcher: Searcher | None, metrics: GatewayMetrics) -> None:
    """``POST /v1/events/{modality}``: events into Kafka (scope ``ingest``)."""
    limits = Limits(settings.gateway_max_events, settings.max_event_bytes)
    infos = list(searcher.info.values()) if searcher is not None else []
    for modality in MODALITIES:
        served_names = sorted(i.name for i in infos if i.modality == modality)
        app.post(
            f"/v1/events/{modality}", name="ingest", status_code=202,
            dependencies=[require("ingest")],
            response_model=schemas.Accepted, responses={**_ERRORS, **_RETRY},
            openapi_extra=ingest_openapi(modality, served_names, settings.gateway_max_events),
            summary=f"Publish {modality} events", operation_id=f"ingest_{modality}",
        )(_ingest_handler(modality, settings, publisher, searcher, metrics, limits))


def _add_query_routes(app: FastAPI, settings: Settings, searcher: Searcher | None,
                      auth: Authenticator) -> None:
    """Search, the OpenAI-compatible embeddings, stored vectors and the served models."""
    infos = list(searcher.info.values()) if searcher is not None else []

    @app.post(
        "/v1/search", name="search", dependencies=[require("search")],
        response_model=schemas.SearchResponse,
        responses={**_ERRORS, **_LIMITED, 501: {"model": schemas.ErrorBody, "description":
                   "The model's modality has no query support in this build."}},
        openapi_extra=search_openapi(infos, settings.gateway_search_max_k),
        summary="Nearest stored items to a text, a file or a stored id",
    )
    async def search(request: Request) -> JSONResponse:
        active = _require(searcher)
        body, request = await _read_body(request, settings.gateway_max_request_bytes)
        ctype = _content_type(request)
        query: str | bytes | None
        if ctype == "multipart/form-data":
            req, query = await _search_form(request, settings, active)
        elif ctype == "application/json" or ctype.endswith("+json"):
            req, query = _search_json(body)
        else:
            raise GatewayError(415, "unsupported_media_type",
                               "send application/json or multipart/form-data")
        if req.k > settings.gateway_search_max_k:
            raise GatewayError(422, "invalid_field", f"k is at most {settings.gateway_search_max_k}")
        tenant = principal_of(request).tenant
        return JSONResponse(await run_in_threadpool(_run_search, active, req, query, tenant))

    @app.post(
        openai_api.PATH, name="embeddings", dependencies=[require("search")],
        response_model=openai_api.EmbeddingsResponse, summary="Embed texts (OpenAI-compatible)",
        responses={s: {"model": openai_api.OpenAIErrorBody} for s in (400, 401, 404, 413, 503)},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": openai_api.request_schema([i for i in infos if i.modality == "text"])}}}},
    )
    async def openai_embeddings(request: Request) -> Response:
        body, _ = await _read_body(request, settings.gateway_max_request_bytes)
        out = await openai_api.create_embeddings(body, _require(searcher))
        return Response(openai_api.dumps(out), media_type="application/json")

    @app.get(
        "/v1/embeddings/{model}/{event_id}", name="embedding", dependencies=[require("search")],
        response_model=schemas.EmbeddingResponse,
        responses={**_ERRORS, **_LIMITED,
                   404: {"model": schemas.ErrorBody, "description": "Not stored."}},
        summary="A stored vector and its fields",
    )
    def embedding(request: Request, model: str, event_id: str, chunk: int = 0) -> JSONResponse:
        active = _require(searcher)
        info = active.model_for(model, "text")
        vector, fields = active.stored_vector(info, event_id, chunk,
                                              tenant=principal_of(request).tenant)
        return JSONResponse({
            "id": event_id, "model": info.name, "dim": int(vector.shape[0]),
            "chunk": int(fields.get("chunk") or 0), "chunks": int(fields.get("chunks") or 1),
            "vector": vector.tolist(), "metadata": metadata_of(fields),
            "fields": {k: v for k, v in fields.items() if k != "metadata"},
        })

    @app.get("/v1/models", name="models", dependencies=[require()],
             response_model=schemas.ModelsResponse, responses={**_ERRORS, **_LIMITED},
             summary="Models served for search, with their filter fields (any valid key)")
    def models(request: Request) -> JSONResponse:
        infos = searcher.info.values() if searcher is not None else []
        principal = principal_of(request)
        return JSONResponse({
            "models": [{"name": i.name, "modality": i.modality, "dimension": i.dimension,
                        "filters": i.schema} for i in infos],
            "auth": auth.enabled,
            "scopes": sorted(principal.scopes),
            "tenant": principal.tenant,
            "rollouts": searcher.rollouts() if searcher is not None else [],
        })


def _add_admin_routes(app: FastAPI, settings: Settings, publisher: EventPublisher) -> None:
    """``DELETE /v1/items/{id}``: a tombstone on every topic (scope ``admin``)."""
    @app.delete(
        "/v1/items/{event_id}", name="delete", status_code=202, dependencies=[require("admin")],
        response_model=schemas.Deleted, responses={**_ERRORS, **_RETRY},
        summary="Delete a document (every chunk, every model) by publishing a tombstone",
    )
    async def delete(
        request: Request,
        event_id: Annotated[str, PathParam(pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)],
        modality: Literal["text", "image", "audio"] | None = None,
    ) -> JSONResponse:
        try:
            check_id(event_id)
        except EnvelopeError as err:
            raise GatewayError(422, err.reason, err.detail) from err
        topics = [settings.topic_for(m) for m in ([modality] if modality else MODALITIES)]
        headers = _tenant_headers(principal_of(request))
        for topic in topics:
            await run_in_threadpool(publisher.publish, topic, [(event_id, None)], headers)
        return JSONResponse({"id": event_id, "topics": topics}, status_code=202)


def _add_operations_routes(app: FastAPI, publisher: EventPublisher, searcher: Searcher | None,
                           metrics: GatewayMetrics) -> None:
    """Health, readiness, metrics and the search page: public."""
    @app.get("/healthz", name="health", summary="Liveness", dependencies=[PUBLIC])
    def healthz() -> dict[str, bool]:
        return {"alive": True}

    @app.get("/readyz", name="health", summary="Readiness: broker, Redis and models",
             dependencies=[PUBLIC],
             responses={503: {"description": "Not ready; see checks."}})
    def readyz() -> JSONResponse:
        checks = {"broker": publisher.ready()}
        if searcher is not None:
            checks.update(redis=searcher.ping(), models=bool(searcher.info))
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", name="metrics", include_in_schema=False, dependencies=[PUBLIC])
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", name="page", include_in_schema=False, dependencies=[PUBLIC])
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")


def _tenant_headers(principal: Principal) -> list[tuple[str, bytes]]:
    """The record headers that stamp a tenant-bound key's tenant on what it publishes."""
    return [(HEADER_TENANT, principal.tenant.encode())] if principal.tenant else []


# ------------------------------------------------------------------ helpers
def _ingest_handler(modality: str, settings: Settings, publisher: EventPublisher,
                    searcher: Searcher | None, metrics: GatewayMetrics, limits: Limits) -> Any:
    topic = settings.topic_for(modality)
    served = searcher.served() if searcher is not None else {}

    async def ingest(request: Request) -> JSONResponse:
        body, request = await _read_body(request, settings.gateway_max_request_bytes)
        ctype = _content_type(request)
        query = request.query_params
        if ctype == "application/json" or ctype.endswith("+json"):
            records = records_from_json(body, modality, topic, limits, served)
        elif ctype == "multipart/form-data":
            uploads, fields = await _multipart(request, settings.gateway_max_request_bytes)
            records = records_from_uploads(
                uploads, modality, topic, limits, served,
                id=fields.get("id"), model=fields.get("model") or query.get("model"),
                metadata=fields.get("metadata"),
            )
        elif _raw_ok(ctype, modality):
            records = records_from_uploads(
                [Upload(body, content_type=ctype)], modality, topic, limits, served,
                id=query.get("id"), model=query.get("model"), metadata=None,
            )
        else:
            raise GatewayError(415, "unsupported_media_type",
                               f"{ctype or 'no content type'} is not accepted for {modality} "
                               f"events; send application/json, multipart/form-data or "
                               f"{_raw_types(modality)}")
        headers = _tenant_headers(principal_of(request))
        await run_in_threadpool(publisher.publish, topic, records, headers)
        metrics.accepted.labels(modality).inc(len(records))
        ids = [event_id for event_id, _ in records]
        return JSONResponse({"ids": ids, "topic": topic, "count": len(ids)}, status_code=202)

    return ingest


def _install_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None,
              request: Request | None = None, param: str | None = None) -> JSONResponse:
        if request is not None and request.url.path.startswith("/v1/events/") and status != 202:
            metrics.rejected.labels(code if status != 429 else "backpressure").inc()
        if request is not None and request.url.path == openai_api.PATH:
            return JSONResponse(openai_api.error_body(status, code, detail, param),
                                status_code=status, headers=headers)
        return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, err: GatewayError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        if isinstance(err, RateLimited):
            headers = {"Retry-After": str(max(1, math.ceil(err.retry_after_s)))}
        return error(err.status, err.code, err.detail, headers, request, getattr(err, "param", None))

    @app.exception_handler(Backpressure)
    async def backpressure(request: Request, err: Backpressure) -> JSONResponse:
        retry = str(max(1, round(err.retry_after_s)))
        return error(429, "backpressure", str(err), {"Retry-After": retry}, request)

    @app.exception_handler(SourceError)
    async def broker_error(request: Request, err: SourceError) -> JSONResponse:
        return error(503, "broker_error", str(err), None, request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return error(422, "invalid_request", detail, None, request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error(err.status_code, code, str(err.detail), None, request)

    app.add_middleware(_Measured, metrics=metrics)


class _Measured:
    """Counts and times every request by route name and status.

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` runs each request
    in a task group and streams its body through a queue, which cost more than the
    handlers of the small requests (one embedding, one search) it wrapped.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception past every handler

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router sets scope["route"] on this very scope when a route matched.
            route = getattr(scope.get("route"), "name", None) or "other"
            path = scope.get("path", "")
            if path in ("/docs", "/openapi.json", "/redoc"):
                route = "docs"
            elif path.startswith("/static/"):
                route = "page"
            route = route if route in GATEWAY_ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


async def _read_body(request: Request, limit: int) -> tuple[bytes, Request]:
    """The body, read within ``limit`` bytes (413 past it), and a request that replays it."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise GatewayError(413, "too_large", f"the body is {length} bytes, limit {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, "too_large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return body, Request(request.scope, replay)


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _raw_types(modality: str) -> str:
    return "text/plain" if modality == "text" else f"application/octet-stream or {modality}/*"


def _raw_ok(ctype: str, modality: str) -> bool:
    if modality == "text":
        return ctype == "text/plain"
    return ctype == "application/octet-stream" or ctype.startswith(f"{modality}/")


async def _multipart(request: Request, limit: int) -> tuple[list[Upload], dict[str, str]]:
    try:
        form = await request.form(max_files=1000, max_fields=100, max_part_size=limit)
    except Exception as err:  # starlette raises its own parse errors (MultiPartException, ...)
        raise GatewayError(400, "invalid_multipart", f"cannot parse the multipart body: {err}") from err
    uploads: list[Upload] = []
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name == "file":
                uploads.append(Upload(await value.read(), value.filename, value.content_type))
        elif name in ("id", "model", "metadata", "k", "filters"):
            fields[name] = value
    return uploads, fields


def _require(searcher: Searcher | None) -> Searcher:
    if searcher is None:
        raise GatewayError(503, "search_unavailable", "this gateway serves ingest only")
    return searcher


def _search_json(body: bytes) -> tuple[schemas.SearchRequest, str | bytes | None]:
    try:
        req = schemas.SearchRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        status = 400 if first["type"] in ("json_invalid", "json_type") else 422
        code = "invalid_json" if status == 400 else "invalid_field"
        raise GatewayError(status, code, f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from err
    given = [name for name in ("text", "id", "data") if getattr(req, name) is not None]
    if len(given) != 1:
        raise GatewayError(422, "invalid_field", "give exactly one of 'text', 'id' or 'data'")
    if req.data is not None:
        try:
            return req, base64.b64decode(req.data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise GatewayError(422, "invalid_field", "'data' is not base64") from err
    return req, req.text


async def _search_form(request: Request, settings: Settings,
                       searcher: Searcher) -> tuple[schemas.SearchRequest, bytes]:
    uploads, fields = await _multipart(request, settings.gateway_max_request_bytes)
    if len(uploads) != 1:
        raise GatewayError(422, "invalid_field", "send exactly one file (field 'file')")
    try:
        filters = json.loads(fields["filters"]) if fields.get("filters") else None
        req = schemas.SearchRequest.model_validate(
            {"model": fields.get("model") or None, "k": int(fields.get("k") or 10),
             "filters": filters, "data": "-"})
    except (ValueError, ValidationError) as err:
        raise GatewayError(422, "invalid_field", f"bad form field: {err}") from err
    if req.model is None:
        kind = (uploads[0].content_type or "").split("/", 1)[0]
        if kind not in ("image", "audio"):
            raise GatewayError(404, "no_model", f"no model chosen for a {kind or 'typeless'} file: "
                               "name the 'model', or send the file as image/* or audio/*")
        req.model = searcher.model_for(None, kind).name
    return req, uploads[0].data


def _run_search(searcher: Searcher, req: schemas.SearchRequest,
                query: str | bytes | None, tenant: str | None) -> dict[str, Any]:
    """Search for ``req``; a tenant's search (``tenant``) sees only that tenant's items,
    whatever ``req.filters`` say (the tenant clause is ANDed to them in the index)."""
    for _ in range(2):
        try:
            return _search_once(searcher, req, query, tenant)
        except IndexMoved:  # a rollout was promoted meanwhile: embed with the new model
            continue
    return _search_once(searcher, req, query, tenant)


def _search_once(searcher: Searcher, req: schemas.SearchRequest,
                 query: str | bytes | None, tenant: str | None) -> dict[str, Any]:
    if req.id is not None:
        info = searcher.model_for(req.model, "text")
        vector, _ = searcher.stored_vector(info, req.id, tenant=tenant)
    else:
        modality = "text" if isinstance(query, str) else "image"
        info = searcher.model_for(req.model, modality)
        if isinstance(query, str) != (info.modality == "text"):
            raise GatewayError(422, "invalid_field",
                               f"model {info.name} embeds {info.modality}; the query does not fit")
        assert query is not None
        vector = searcher.embed(info, query)
    filters = parse_filters(req.filters, info)
    hits = searcher.search(info, vector, req.k, filters, exclude=req.id,
                           per_document=not req.all_chunks, tenant=tenant)
    return {"model": info.name, "hits": [_hit_json(h) for h in hits]}


def _hit_json(hit: Hit) -> dict[str, Any]:
    span = hit.span
    return {
        "id": hit.id, "score": hit.score, "key": hit.key, "chunk": hit.chunk,
        "chunks": hit.chunks, "text": hit.fields.get("text") or None,
        "start": span[0] if span else None, "end": span[1] if span else None,
        "metadata": hit.metadata,
        "fields": {k: v for k, v in hit.fields.items()
                   if v != "" and k not in ("text", "chunk", "chunks", "start", "end")},
    }
