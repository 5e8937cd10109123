"""Every modality's preprocessor, and the choice of one by a model's manifest.

:mod:`embedstream.preprocess.base` holds the interface and the registry
(:data:`~embedstream.preprocess.base.PREPROCESSORS`); the modality modules
beside it (``text``, ``wordvec``, ``image``, ``audio``) import that interface
and register their implementations. This module is the one place that
imports them all, so the interface never imports its implementations back.
"""

from __future__ import annotations

from pathlib import Path

from embedstream.errors import ConfigError
from embedstream.models.manifest import Manifest
from embedstream.preprocess.base import PREPROCESSORS, Limits, Preprocessor


def build_preprocessor(manifest: Manifest, model_dir: Path, limits: Limits) -> Preprocessor:
    """The preprocessor the manifest asks for (``modality`` and ``extra["kind"]``)."""
    # Imported on first use, not with this module: a text-only worker never
    # loads Pillow or soundfile. Importing them fills PREPROCESSORS.
    from embedstream.preprocess import audio, image, text, wordvec  # noqa: F401  (registration)

    key = (manifest.modality, str(manifest.extra.get("kind", "")))
    try:
        factory = PREPROCESSORS[key]
    except KeyError as err:
        raise ConfigError(
            f"model {manifest.name}: no preprocessor for modality/kind {key}; "
            f"known: {sorted(PREPROCESSORS)}"
        ) from err
    return factory(manifest, model_dir, limits)
