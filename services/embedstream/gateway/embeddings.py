"""``POST /v1/embeddings``: the OpenAI embeddings API over the models the workers run.

Request ``{"model", "input": str | [str], "encoding_format": "float" | "base64",
"dimensions"?, "user"?}``; response ``{"object": "list", "data": [{"object":
"embedding", "index", "embedding"}], "model", "usage": {"prompt_tokens",
"total_tokens"}}``; errors in OpenAI's shape ``{"error": {"message", "type",
"param", "code"}}`` (see :func:`error_body`), so the official clients and the
frameworks built on them (LangChain's ``OpenAIEmbeddings``, LlamaIndex's
``OpenAIEmbedding``) work unchanged with ``base_url`` set to the gateway.

Where it differs from OpenAI, it says so with a 400:

* ``model`` must be a model this gateway serves (``GET /v1/models``).
* Inputs of token ids (``[int]`` or ``[[int]]``) are refused: ids from another
  tokenizer (tiktoken) mean nothing to our models. LangChain's
  ``OpenAIEmbeddings`` sends them unless ``check_embedding_ctx_length=False``.
* A text over the model's token limit is refused (as OpenAI does), never cut.
* ``dimensions`` other than the model's own is refused, unless the model was
  trained to be shortened (Matryoshka, its manifest's ``extra.matryoshka_dims``):
  then the vector is cut to that length and L2-normalised again.
* Image and audio models take each input as a ``data:`` URL
  (``data:image/png;base64,...``); ``usage`` counts one per image or
  preprocessed audio frame.

Inputs are tokenized in the request's thread and embedded through the model's
dynamic batcher (:mod:`embedstream.batching.dynamic`), shared with
``/v1/search``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any, Literal

import numpy as np
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, ValidationError

from embedstream.envelope import NOT_BLANK
from embedstream.errors import GatewayError
from embedstream.gateway.query import ModelInfo, Searcher

PATH = "/v1/embeddings"
MAX_INPUTS = 2048
"""Most inputs in one request (OpenAI's limit)."""

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
          422: "invalid_request_error", 429: "rate_limit_error"}


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request."""

    model: str = Field(description="A served model's name (GET /v1/models).")
    input: str | list[Any] = Field(
        description="A string or a list of strings (at most 2048). Image and audio models: "
                    "data: URLs. Token ids are refused.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: JSON numbers; base64: little-endian float32 bytes.")
    dimensions: int | None = Field(
        None, ge=1, description="The model's own dimension, or a Matryoshka length it declares.")
    user: str | None = Field(None, description="Accepted and ignored.")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


class InvalidRequest(GatewayError):
    """A 400 that names the request field at fault (OpenAI's ``param``)."""

    def __init__(self, code: str, detail: str, param: str | None = None) -> None:
        super().__init__(400, code, detail)
        self.param = param


def request_schema(models: list[ModelInfo]) -> dict[str, Any]:
    """The request body's JSON Schema, as precise as the checks behind it (every request it
    calls valid is answered 200, bar texts over a model's token limit)."""
    schema = EmbeddingsRequest.model_json_schema()
    text = {"type": "string", "pattern": NOT_BLANK}
    properties = schema["properties"]
    properties["input"] = {**properties["input"], "anyOf": [
        text, {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS, "items": text}]}
    if models:
        properties["model"] = {"type": "string", "enum": [m.name for m in models],
                               "description": "A served text model's name."}
        properties["dimensions"] = {"anyOf": [{"type": "integer", "enum": sorted(
            {d for m in models for d in (m.dimension, *m.shorter_dims)})}, {"type": "null"}],
            "description": "The model's own dimension, or a Matryoshka length it declares."}
    return schema


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def create_embeddings(body: bytes, searcher: Searcher) -> dict[str, Any]:
    """The response body for a request body (raises :class:`GatewayError`)."""
    req = _parse(body)
    info = searcher.model_for(req.model, "text")
    dims = _dimensions(req.dimensions, info)
    inputs = _inputs(req.input, info)
    prepared = await run_in_threadpool(searcher.prepare, info, inputs)
    if info.modality == "text":
        for index, item in enumerate(prepared):
            if item.truncated:
                raise InvalidRequest(
                    "context_length_exceeded",
                    f"input[{index}] is longer than {info.name}'s limit of "
                    f"{item.cost} tokens; split it (the worker chunks long texts)", "input")
    futures = searcher.submit(info, prepared)
    await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
    vectors = [searcher.vector_of(f) for f in futures]
    tokens = sum(item.cost for item in prepared)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(_cut(v, dims),
                                                                           req.encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": info.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _parse(body: bytes) -> EmbeddingsRequest:
    try:
        return EmbeddingsRequest.model_validate_json(body)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] in ("json_invalid", "json_type"):
            raise InvalidRequest("invalid_json", f"the body is not a JSON object: {first['msg']}") \
                from err
        param = ".".join(map(str, first["loc"])) or None
        raise InvalidRequest("invalid_value", f"{param}: {first['msg']}", param) from err


def _inputs(raw: str | list[Any], info: ModelInfo) -> list[str] | list[bytes]:
    texts = [raw] if isinstance(raw, str) else raw
    if not texts:
        raise InvalidRequest("invalid_value", "'input' is an empty list", "input")
    if len(texts) > MAX_INPUTS:
        raise InvalidRequest("invalid_value", f"'input' has {len(texts)} items, at most "
                             f"{MAX_INPUTS}", "input")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in texts) or all(
            isinstance(t, list) for t in texts):
        raise InvalidRequest(
            "token_ids_not_supported",
            "'input' holds token ids: this gateway tokenizes with the model's own tokenizer, "
            "so send strings (LangChain's OpenAIEmbeddings: check_embedding_ctx_length=False)",
            "input")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidRequest("invalid_value", f"input[{index}] is a {type(text).__name__}, "
                                 "not a string", "input")
        if not text.strip():
            raise InvalidRequest("invalid_value", f"input[{index}] is empty", "input")
    if info.modality == "text":
        return texts
    return [_data_url(text, index, info) for index, text in enumerate(texts)]


def _data_url(text: str, index: int, info: ModelInfo) -> bytes:
    """The bytes of a ``data:<type>;base64,<payload>`` URL (image and audio models)."""
    head, sep, payload = text.partition(",")
    if not (sep and head.startswith("data:") and head.endswith(";base64")):
        raise InvalidRequest("invalid_value", f"input[{index}]: {info.name} embeds "
                             f"{info.modality}; send data:{info.modality}/...;base64,... URLs",
                             "input")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidRequest("invalid_value", f"input[{index}]: the data URL is not base64",
                             "input") from err


def _dimensions(wanted: int | None, info: ModelInfo) -> int | None:
    """None (keep the vector whole) or the length to cut to."""
    if wanted is None or wanted == info.dimension:
        return None
    if wanted in info.shorter_dims:
        return wanted
    shorter = f"; or one of {list(info.shorter_dims)}" if info.shorter_dims else (
        ": it was not trained to be shortened (Matryoshka), and a cut vector would silently "
        "lose quality")
    raise InvalidRequest("invalid_value", f"'dimensions' must be {info.dimension} for "
                         f"{info.name}{shorter}", "dimensions")


def _cut(vector: np.ndarray, dims: int | None) -> np.ndarray:
    if dims is None:
        return vector
    short = vector[:dims]
    norm = float(np.linalg.norm(short))
    return short / norm if norm > 0 else short


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


def dumps(body: dict[str, Any]) -> bytes:
    """Compact JSON (vectors make bodies large)."""
    return json.dumps(body, separators=(",", ":")).encode("utf-8")
