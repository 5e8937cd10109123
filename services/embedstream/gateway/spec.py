"""The request-body parts of the OpenAPI spec, as precise as the validation behind them.

The bodies are read and validated by hand (they come as JSON, multipart or raw
bytes), so FastAPI cannot derive their schemas; these functions write them,
per modality and from the models actually served, so that every request the
spec calls valid is accepted (schemathesis checks exactly that).
"""

from __future__ import annotations

from typing import Any

from embedstream.envelope import MAX_ID_LENGTH
from embedstream.gateway.query import ModelInfo

# Whitespace as Python's str.isspace() sees it, spelled out: JSON Schema's (ECMA-262) \s
# lacks some of it (U+0085), and generators follow ECMA-262.
_SPACE = r"\s\u001c-\u001f\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
ID_PATTERN = rf"^[^{_SPACE}\x00-\x1f]+$"
# A text must have a character that is not whitespace, so spec and validation agree.
NOT_BLANK = f"[^{_SPACE}]"


def _model_schema(models: list[str]) -> dict[str, Any]:
    return {"type": "string", "enum": models} if models else {"type": "string", "minLength": 1}


def _id_schema() -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": ID_PATTERN}


def envelope_schema(modality: str, models: list[str]) -> dict[str, Any]:
    """The JSON envelope of ``modality`` (README "Wire format")."""
    properties: dict[str, Any] = {
        "id": {**_id_schema(), "description": "Event id; assigned by the gateway when absent."},
        "model": {**_model_schema(models), "description": "Default: the modality's model."},
        "metadata": {
            "type": "object",
            "description": "The producer's own fields, any names; stored with every chunk "
                           "and given back unchanged by search.",
        },
    }
    if modality == "text":
        properties["text"] = {"type": "string", "pattern": NOT_BLANK}
        return {"type": "object", "properties": properties, "required": ["text"],
                "additionalProperties": False}
    properties["data"] = {"type": "string", "format": "byte", "minLength": 1,
                          "description": "The file, base64."}
    properties["uri"] = {"type": "string", "minLength": 1,
                         "description": "Where the worker fetches the file."}
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "oneOf": [{"required": ["data"]}, {"required": ["uri"]}]}


def ingest_openapi(modality: str, models: list[str], max_events: int) -> dict[str, Any]:
    """``openapi_extra`` of ``POST /v1/events/<modality>``: bodies and raw-upload parameters."""
    envelope = envelope_schema(modality, models)
    content: dict[str, Any] = {
        "application/json": {"schema": {"anyOf": [
            envelope, {"type": "array", "items": envelope, "minItems": 1, "maxItems": max_events},
        ]}},
    }
    if modality == "text":
        content["text/plain"] = {"schema": {"type": "string", "pattern": NOT_BLANK}}
    else:
        content["multipart/form-data"] = {"schema": {
            "type": "object",
            "properties": {
                "file": {"type": "array", "minItems": 1,
                         "items": {"type": "string", "format": "binary", "minLength": 1}},
                "model": _model_schema(models),
            },
            "required": ["file"],
        }}
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary", "minLength": 1}}
    return {
        "requestBody": {"required": True, "content": content},
        "parameters": [
            {"name": "id", "in": "query", "required": False, "schema": _id_schema(),
             "description": "Event id of a raw-body upload (multipart bodies use their 'id' "
             "field)."},
            {"name": "model", "in": "query", "required": False, "schema": _model_schema(models),
             "description": "Model of a raw-body upload."},
        ],
        "description": (
            f"The body is one {modality} envelope or a list of them (application/json)"
            + (", or the text itself (text/plain)." if modality == "text" else
               f", files (multipart/form-data, field 'file', repeatable; optional fields 'id', "
               f"'model', 'metadata' as a JSON object), or one file as the raw body "
               f"(application/octet-stream or {modality}/*).")
            + " All or nothing: one invalid envelope refuses the request and nothing is published."
        ),
    }


def _filters_schema(infos: list[ModelInfo]) -> dict[str, Any]:
    fields: dict[str, str] = {}
    for info in infos:
        for name, kind in info.schema.items():
            fields.setdefault(name, kind)
    tag = {"anyOf": [{"type": "string", "minLength": 1},
                     {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}]}
    number = {"type": "number"}
    numeric = {"anyOf": [number, {
        "type": "object", "minProperties": 1, "additionalProperties": False,
        "properties": {op: number for op in ("gt", "gte", "lt", "lte")},
    }]}
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {name: tag if kind == "tag" else numeric for name, kind in fields.items()},
        "description": 'Metadata filters on indexed fields: {"lang": "en", "year": {"gte": 2000}}.',
    }


def search_openapi(infos: list[ModelInfo], max_k: int) -> dict[str, Any]:
    """``openapi_extra`` of ``POST /v1/search``: by text, by stored id, or by file."""
    text_models = [i.name for i in infos if i.modality == "text"]
    media_models = [i.name for i in infos if i.modality != "text"]
    common = {
        "k": {"type": "integer", "minimum": 1, "maximum": max_k, "default": 10},
        "filters": _filters_schema(infos),
    }
    by_text = {"type": "object", "required": ["text"], "additionalProperties": False,
               "properties": {"text": {"type": "string"}, "model": _model_schema(text_models),
                              **common}}
    by_id = {"type": "object", "required": ["id"], "additionalProperties": False,
             "properties": {"id": _id_schema(), "model": _model_schema([i.name for i in infos]),
                            **common}}
    by_data = {"type": "object", "required": ["data"], "additionalProperties": False,
               "properties": {"data": {"type": "string", "format": "byte"},
                              "model": _model_schema(media_models), **common}}
    return {
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"oneOf": [by_text, by_id, by_data]}},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"},
                               "model": _model_schema(media_models),
                               "k": {"type": "integer", "minimum": 1, "maximum": max_k}},
            }},
        }},
        "description": (
            "JSON: exactly one of 'text', 'id' (a stored item of 'model': its neighbours, itself "
            "left out) or 'data' (base64 image/audio). Multipart: one 'file' (an image or audio "
            "upload), optional 'model', 'k' and 'filters' (a JSON object as text). A query that "
            "no served model can embed is answered 404 no_model."
        ),
    }
