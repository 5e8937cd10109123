"""Load the models a worker (or the search command) serves."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedstream.errors import ConfigError, ModelError
from embedstream.models.manifest import Manifest, find_models, load_manifest
from embedstream.runtime.base import Backend
from embedstream.runtime.registry import get_backend_factory
from embedstream.runtime.text import TextPreprocessor, Tokenized

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to run: its manifest, preprocessing and backend."""

    manifest: Manifest
    directory: Path
    backend: Backend
    text: TextPreprocessor | None = None

    @property
    def name(self) -> str:
        return self.manifest.name

    def embed_tokenized(self, items: list[Tokenized]) -> np.ndarray:
        if self.text is None:
            raise ModelError(f"model {self.name} is not a text model")
        return self.backend.embed(self.text.pack(items))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts in one batch (for queries and tools, not the hot path)."""
        if self.text is None:
            raise ModelError(f"model {self.name} is not a text model")
        return self.embed_tokenized(self.text.tokenize(texts))


def load_model(
    directory: Path, *, backend: str = "onnxruntime", providers: list[str], threads: int
) -> LoadedModel:
    manifest = load_manifest(directory)
    factory = get_backend_factory(backend)
    engine = factory(str(manifest.onnx_path(directory)), providers=providers, threads=threads)
    text = TextPreprocessor(manifest, directory) if manifest.modality == "text" else None
    return LoadedModel(manifest=manifest, directory=directory, backend=engine, text=text)


def load_models(
    root: Path,
    names: list[str],
    *,
    backend: str = "onnxruntime",
    providers: list[str],
    threads: int,
) -> dict[str, LoadedModel]:
    """Load ``names`` (all models under ``root`` when empty). Fails on any missing one."""
    available = find_models(root)
    wanted = names or sorted(available)
    if not wanted:
        raise ConfigError(
            f"no models under {root.resolve()}: run 'embedstream export' first "
            "or point --model-dir at a folder of exported models"
        )
    missing = [n for n in wanted if n not in available]
    if missing:
        raise ConfigError(
            f"model(s) {missing} not found under {root.resolve()}; found: {sorted(available)}"
        )
    models = {}
    for name in wanted:
        models[name] = load_model(
            available[name], backend=backend, providers=providers, threads=threads
        )
        log.info("model %s ready (%s, %d-d)", name, models[name].manifest.modality,
                 models[name].manifest.dimension)
    return models
