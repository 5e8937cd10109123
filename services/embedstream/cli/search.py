"""``embedstream search``: the nearest stored items to a text, image or audio query."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from embedstream.cli.flags import CONNECTION, MODELS, add_settings_flags
from embedstream.cli.registry import Command
from embedstream.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

    from embedstream.runtime.loader import LoadedModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="?", help="query text")
    example = parser.add_mutually_exclusive_group()
    example.add_argument("--image", type=Path, help="search by example: an image file")
    example.add_argument("--audio", type=Path, help="search by example: an audio file")
    parser.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    parser.add_argument("--model", help="model to search (default: the modality's default model)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--all-chunks", action="store_true",
                        help="every matching chunk, not one hit per document (its best chunk)")
    add_settings_flags(parser, (*CONNECTION, *MODELS))


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.image or args.audio:
        modality, path = ("image", args.image) if args.image else ("audio", args.audio)
        return search_example(settings, modality, path, k=args.k, model=args.model,
                              as_json=args.json, all_chunks=args.all_chunks)
    if not args.query:
        raise SystemExit("embedstream search: give a query text, --image FILE or --audio FILE")
    return search_text(settings, args.query, k=args.k, model=args.model, as_json=args.json,
                       all_chunks=args.all_chunks)


def search_text(
    settings: Settings, query: str, *, k: int, model: str | None, as_json: bool,
    all_chunks: bool = False,
) -> int:
    name = model or settings.default_text_model
    return _search(settings, name, lambda m: _load(settings, m).embed_texts([query])[0],
                   repr(query), k, as_json, all_chunks)


def search_example(
    settings: Settings, modality: str, path: Path, *, k: int, model: str | None, as_json: bool,
    all_chunks: bool = False,
) -> int:
    """Search by example: embed an image or audio file with the model, find its neighbours."""
    name = model or settings.default_model_for(modality)
    data = path.read_bytes()

    def embed(served: str) -> np.ndarray:
        loaded = _load(settings, served)
        return (loaded.embed_images([data]) if modality == "image"
                else loaded.embed_audio([data]))[0]

    return _search(settings, name, embed, str(path), k, as_json, all_chunks)


def _load(settings: Settings, name: str) -> LoadedModel:
    from embedstream.runtime.loader import load_configured

    return load_configured(settings, [name])[name]


def _search(
    settings: Settings, name: str, embed: Callable[[str], np.ndarray], query: str, k: int,
    as_json: bool, all_chunks: bool,
) -> int:
    """Search ``name``'s vectors: the query embedded (``embed(model)``) with the model
    serving ``name`` now, which a promoted rollout may have changed."""
    from embedstream.rollout.query import search_serving
    from embedstream.sinks.redis import connect

    client = connect(settings.redis)
    try:
        name, hits = search_serving(client, settings.key_prefix, name, embed, k,
                                    per_document=not all_chunks,
                                    cluster_search=settings.redis_cluster_search)
    finally:
        client.close()
    if as_json:
        print(json.dumps([{**h.fields, "id": h.id, "score": h.score, "chunk": h.chunk,
                           "chunks": h.chunks, "metadata": h.metadata} for h in hits],
                         indent=2, ensure_ascii=False))
        return 0
    if not hits:
        print(f"no stored items for model {name}")
        return 0
    kind = "chunks" if all_chunks else "documents"
    print(f"nearest {len(hits)} {kind} to {query} ({name}):")
    for rank, hit in enumerate(hits, start=1):
        label = hit.fields.get("text") or hit.metadata.get("path") or hit.id
        where = f" [{hit.id}, chunk {hit.chunk + 1}/{hit.chunks}]" if hit.chunks > 1 else ""
        print(f"{rank:>3}. {hit.score:.4f}  {label}{where}")
    return 0


COMMANDS = (Command("search", "nearest stored items to a text, image or audio query",
                    add_arguments, run),)
