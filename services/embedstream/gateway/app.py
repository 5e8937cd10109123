"""The gateway's HTTP application (FastAPI): ingest, search, embeddings, health, page.

Errors are JSON ``{"error": <code>, "detail": <text>}`` with a 4xx/5xx status;
``code`` is stable (envelope reason codes for invalid events). Nothing of a
refused ingest request reaches Kafka: bodies are read within the size limit,
every envelope is validated, and only then is the whole request published.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from embedstream import __version__
from embedstream.envelope import MAX_ID_LENGTH, check_id
from embedstream.errors import Backpressure, EnvelopeError, GatewayError, SourceError
from embedstream.gateway import schemas
from embedstream.gateway.auth import KeyCheck
from embedstream.gateway.ingest import Limits, Upload, records_from_json, records_from_uploads
from embedstream.gateway.publisher import EventPublisher
from embedstream.gateway.query import Searcher, parse_filters
from embedstream.gateway.spec import ID_PATTERN, ingest_openapi, search_openapi
from embedstream.metrics import GATEWAY_ROUTES, GatewayMetrics
from embedstream.search import Hit
from embedstream.settings import MODALITIES, Settings
from embedstream.sinks.layout import metadata_of

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorBody, "description": text}
    for status, text in (
        (400, "Malformed body (not JSON, bad filter)."),
        (401, "Missing or wrong API key."),
        (404, "Unknown model or stored id, or no model for the query."),
        (413, "Body, envelope or event count over the limit."),
        (415, "Content type not accepted for this modality."),
        (422, "An envelope or field is invalid (code: the envelope reason)."),
        (503, "The broker or Redis is unavailable, or search is off."),
    )
}
_RETRY: dict[int | str, dict[str, Any]] = {
    429: {"model": schemas.ErrorBody, "description": "Backpressure: retry after the Retry-After "
          "seconds (producer buffer full or broker unreachable)."}
}

def create_app(
    settings: Settings,
    publisher: EventPublisher,
    searcher: Searcher | None = None,
    metrics: GatewayMetrics | None = None,
) -> FastAPI:
    """The gateway application over ``publisher`` (and ``searcher``; None: no search)."""
    metrics = metrics or GatewayMetrics()
    keys = KeyCheck(settings.api_keys())
    limits = Limits(settings.gateway_max_events, settings.max_event_bytes)
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
    _install_handlers(app, metrics)
    auth = [Depends(keys)]

    infos = list(searcher.info.values()) if searcher is not None else []
    for modality in MODALITIES:
        served_names = sorted(i.name for i in infos if i.modality == modality)
        app.post(
            f"/v1/events/{modality}", name="ingest", status_code=202, dependencies=auth,
            response_model=schemas.Accepted, responses={**_ERRORS, **_RETRY},
            openapi_extra=ingest_openapi(modality, served_names, settings.gateway_max_events),
            summary=f"Publish {modality} events", operation_id=f"ingest_{modality}",
        )(_ingest_handler(modality, settings, publisher, searcher, metrics, limits))

    @app.post(
        "/v1/search", name="search", dependencies=auth, response_model=schemas.SearchResponse,
        responses={**_ERRORS, 501: {"model": schemas.ErrorBody, "description":
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
        return JSONResponse(await run_in_threadpool(_run_search, active, req, query))

    @app.get(
        "/v1/embeddings/{model}/{event_id}", name="embedding", dependencies=auth,
        response_model=schemas.EmbeddingResponse,
        responses={**_ERRORS, 404: {"model": schemas.ErrorBody, "description": "Not stored."}},
        summary="A stored vector and its fields",
    )
    def embedding(model: str, event_id: str, chunk: int = 0) -> JSONResponse:
        active = _require(searcher)
        info = active.model_for(model, "text")
        vector, fields = active.stored_vector(info, event_id, chunk)
        return JSONResponse({
            "id": event_id, "model": info.name, "dim": int(vector.shape[0]),
            "chunk": int(fields.get("chunk") or 0), "chunks": int(fields.get("chunks") or 1),
            "vector": vector.tolist(), "metadata": metadata_of(fields),
            "fields": {k: v for k, v in fields.items() if k != "metadata"},
        })

    @app.delete(
        "/v1/items/{event_id}", name="delete", status_code=202, dependencies=auth,
        response_model=schemas.Deleted, responses={**_ERRORS, **_RETRY},
        summary="Delete a document (every chunk, every model) by publishing a tombstone",
    )
    async def delete(
        event_id: Annotated[str, PathParam(pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)],
        modality: Literal["text", "image", "audio"] | None = None,
    ) -> JSONResponse:
        try:
            check_id(event_id)
        except EnvelopeError as err:
            raise GatewayError(422, err.reason, err.detail) from err
        topics = [settings.topic_for(m) for m in ([modality] if modality else MODALITIES)]
        for topic in topics:
            await run_in_threadpool(publisher.publish, topic, [(event_id, None)])
        return JSONResponse({"id": event_id, "topics": topics}, status_code=202)

    @app.get("/v1/models", name="models", dependencies=auth, response_model=schemas.ModelsResponse,
             responses=_ERRORS, summary="Models served for search, with their filter fields")
    def models() -> JSONResponse:
        infos = searcher.info.values() if searcher is not None else []
        return JSONResponse({
            "models": [{"name": i.name, "modality": i.modality, "dimension": i.dimension,
                        "filters": i.schema} for i in infos],
            "auth": keys.enabled,
        })

    @app.get("/healthz", name="health", summary="Liveness")
    def healthz() -> dict[str, bool]:
        return {"alive": True}

    @app.get("/readyz", name="health", summary="Readiness: broker, Redis and models",
             responses={503: {"description": "Not ready; see checks."}})
    def readyz() -> JSONResponse:
        checks = {"broker": publisher.ready()}
        if searcher is not None:
            checks.update(redis=searcher.ping(), models=bool(searcher.info))
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @app.get("/metrics", name="metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", name="page", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="page-static")
    return app


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
        await run_in_threadpool(publisher.publish, topic, records)
        metrics.accepted.labels(modality).inc(len(records))
        ids = [event_id for event_id, _ in records]
        return JSONResponse({"ids": ids, "topic": topic, "count": len(ids)}, status_code=202)

    return ingest


def _install_handlers(app: FastAPI, metrics: GatewayMetrics) -> None:
    def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None,
              request: Request | None = None) -> JSONResponse:
        if request is not None and request.url.path.startswith("/v1/events/") and status != 202:
            metrics.rejected.labels(code if status != 429 else "backpressure").inc()
        return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, err: GatewayError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return error(err.status, err.code, err.detail, headers, request)

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

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = getattr(request.scope.get("route"), "name", None) or "other"
        if request.url.path in ("/docs", "/openapi.json", "/redoc"):
            route = "docs"
        elif request.url.path.startswith("/static/"):
            route = "page"
        route = route if route in GATEWAY_ROUTES else "other"
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
        return response


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
                query: str | bytes | None) -> dict[str, Any]:
    if req.id is not None:
        info = searcher.model_for(req.model, "text")
        vector, _ = searcher.stored_vector(info, req.id)
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
                           per_document=not req.all_chunks)
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
