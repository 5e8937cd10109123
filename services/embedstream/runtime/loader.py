"""Load the models a worker (or the search command) serves."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstream.errors import ConfigError, EnvelopeError, ModelError
from embedstream.models.manifest import Manifest, find_models, load_manifest
from embedstream.preprocess.base import Limits, Prepared, Preprocessor
from embedstream.preprocess.modalities import build_preprocessor
from embedstream.runtime.base import Backend
from embedstream.runtime.memory import grew, rss_mb
from embedstream.runtime.registry import get_backend_factory

if TYPE_CHECKING:
    from embedstream.settings import Settings

log = logging.getLogger(__name__)

TOKEN_OUTPUT = "token_embeddings"


@dataclass
class LoadedModel:
    """A model ready to run: its manifest, its preprocessor and its backend.

    The worker's hot path calls ``preprocessor.prepare`` (pre stage) and
    :meth:`embed_prepared` (inference stage) separately. Tools and query
    paths (search by example, a gateway) call :meth:`embed_texts`,
    :meth:`embed_images` or :meth:`embed_audio`: decode, preprocess and run
    one batch, raising :class:`EnvelopeError` for the first bad input.
    """

    manifest: Manifest
    directory: Path
    backend: Backend
    preprocessor: Preprocessor
    load_mb: float | None = None
    """Resident memory that loading this model added (weights, tokenizer, tables)."""
    warmup_mb: float | None = None
    """Resident memory that its warm-up batch added (activations kept for reuse)."""

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def modality(self) -> str:
        return self.manifest.modality

    @property
    def token_mode(self) -> bool:
        """True when the graph also outputs per-token vectors (``token_embeddings``)."""
        return TOKEN_OUTPUT in self.manifest.outputs

    def embed_prepared(self, items: Sequence[Prepared]) -> np.ndarray:
        """``[len(items), dimension]`` for items this model's preprocessor prepared."""
        return self.backend.embed(self.preprocessor.pack(items))

    def embed_prepared_tokens(
        self, items: Sequence[Prepared]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Pooled vectors and, per item, its ``[tokens, dimension]`` contextual token vectors
        (padding removed). Only for token-mode models."""
        if not self.token_mode:
            raise ModelError(f"model {self.name} was not exported in token mode")
        pooled, tokens = self.backend.run(self.preprocessor.pack(items),
                                          [self.manifest.outputs[0], TOKEN_OUTPUT])
        return pooled, [tokens[row, : item.cost] for row, item in enumerate(items)]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts in one batch (for queries and tools, not the hot path)."""
        return self._embed_raw("text", texts)

    def embed_images(self, images: list[bytes]) -> np.ndarray:
        """Embed encoded images (JPEG, PNG, WebP, GIF bytes) in one batch."""
        return self._embed_raw("image", images)

    def embed_audio(self, clips: list[bytes]) -> np.ndarray:
        """Embed encoded audio files (WAV, FLAC, OGG, MP3 bytes) in one batch."""
        return self._embed_raw("audio", clips)

    def _embed_raw(self, modality: str, inputs: Sequence[Any]) -> np.ndarray:
        if self.modality != modality:
            raise ModelError(f"model {self.name} is a {self.modality} model, not a {modality} one")
        if not inputs:
            return np.zeros((0, self.manifest.dimension), np.float32)
        items: list[Prepared] = []
        for result in self.preprocessor.prepare(inputs):
            if isinstance(result, EnvelopeError):
                raise result
            items.append(result)
        return self.embed_prepared(items)


def load_model(
    directory: Path,
    *,
    backend: str = "onnxruntime",
    providers: list[str],
    threads: int,
    limits: Limits | None = None,
) -> LoadedModel:
    manifest = load_manifest(directory)
    factory = get_backend_factory(backend)
    engine = factory(str(manifest.onnx_path(directory)), providers=providers, threads=threads)
    preprocessor = build_preprocessor(manifest, directory, limits or Limits())
    return LoadedModel(manifest, directory, engine, preprocessor)


def check_models(root: Path, names: list[str]) -> dict[str, Path]:
    """The directories of ``names`` (all models under ``root`` when empty), without
    loading them: a ConfigError that says what to do when there are none or one is
    missing."""
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
    return {name: available[name] for name in wanted}


def load_models(
    root: Path,
    names: list[str],
    *,
    backend: str = "onnxruntime",
    providers: list[str],
    threads: int,
    limits: Limits | None = None,
) -> dict[str, LoadedModel]:
    """Load ``names`` (all models under ``root`` when empty). Fails on any missing one.

    Each model's cost in resident memory is logged as it loads."""
    available = check_models(root, names)
    models = {}
    for name, directory in available.items():
        before = rss_mb()
        models[name] = load_model(
            directory, backend=backend, providers=providers, threads=threads,
            limits=limits,
        )
        # What serving this model costs (weights, tokenizer or tables), so a worker
        # that serves every model in the directory shows where its memory went.
        after = rss_mb()
        if before is not None and after is not None:
            models[name].load_mb = after - before
        log.info("model %s loaded (%s, %d-d): %s", name, models[name].manifest.modality,
                 models[name].manifest.dimension, grew(before, after))
    return models


def load_configured(settings: Settings, names: list[str], *,
                    threads: int | None = None) -> dict[str, LoadedModel]:
    """``names`` (every model under ``model_dir`` when empty) loaded the way the settings
    say: their backend, providers, input limits and inference threads (``threads``
    overrides ``intra_op_threads``). The one way a service loads the models it serves."""
    get_backend_factory(settings.backend)  # an unknown backend is named before any model loads
    return load_models(
        settings.model_dir, names, backend=settings.backend, providers=settings.providers,
        threads=settings.intra_op_threads if threads is None else threads,
        limits=Limits.from_settings(settings),
    )
