"""The gateway's JSON shapes (responses and the documented request bodies)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Envelope(BaseModel):
    """The wire envelope (README "Wire format"): text events carry ``text``,
    image/audio events ``data`` (base64) or ``uri``."""

    id: str | None = Field(None, description="Event id (1..512 chars, no whitespace); "
                           "the gateway assigns one when absent.")
    text: str | None = None
    data: str | None = Field(None, description="Base64 bytes of an image or audio file.")
    uri: str | None = None
    model: str | None = Field(None, description="Model name; default: the modality's.")
    metadata: dict[str, Any] | None = Field(
        None, description="The producer's own fields (any names, any JSON values): stored "
        "with every chunk, given back unchanged by search.")


class Accepted(BaseModel):
    ids: list[str] = Field(description="Event ids, in request order.")
    topic: str
    count: int


class ErrorBody(BaseModel):
    error: str = Field(description="Stable reason code, e.g. invalid_json, payload_too_large.")
    detail: str


class SearchRequest(BaseModel):
    """Exactly one of ``text``, ``id`` or ``data``."""

    text: str | None = Field(None, description="Query text (text models).")
    id: str | None = Field(None, description="Search by a stored item: its id under `model`.")
    data: str | None = Field(None, description="Base64 image or audio bytes (media models).")
    model: str | None = Field(None, description="Model to search; default: the query's modality's.")
    k: int = Field(10, ge=1, description="How many results.")
    filters: dict[str, Any] | None = Field(
        None, description='Metadata filters on indexed fields: {"lang": "en", "year": {"gte": 2000}}.'
    )
    all_chunks: bool = Field(
        False, description="Every matching chunk instead of one hit per document (its best "
        "chunk); k then counts chunks.")


class SearchHit(BaseModel):
    id: str = Field(description="The document id.")
    score: float = Field(description="Cosine similarity, 1 = same direction.")
    key: str = Field(description="The Redis key of the hit's chunk.")
    chunk: int = Field(description="The chunk's index in its document (0 when it is whole).")
    chunks: int = Field(description="How many chunks the document has.")
    text: str | None = Field(None, description="The chunk's text (text models).")
    start: int | None = Field(None, description="The chunk's first character in the text.")
    end: int | None = Field(None, description="One past the chunk's last character.")
    metadata: dict[str, Any] = Field(description="The document's metadata, as sent.")
    fields: dict[str, str] = Field(description="Other stored fields: model, modality, "
                                   "created_at, source...")


class SearchResponse(BaseModel):
    model: str
    hits: list[SearchHit]


class EmbeddingResponse(BaseModel):
    id: str
    model: str
    dim: int
    chunk: int
    chunks: int
    vector: list[float]
    metadata: dict[str, Any]
    fields: dict[str, str]


class Deleted(BaseModel):
    id: str
    topics: list[str] = Field(description="Where the tombstones went.")


class ModelDescription(BaseModel):
    name: str
    modality: str
    dimension: int
    filters: dict[str, str] = Field(description="Indexed metadata fields: name -> tag | numeric.")


class ModelsResponse(BaseModel):
    models: list[ModelDescription]
    auth: bool = Field(description="True when requests need an API key.")
