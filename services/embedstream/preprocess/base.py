"""The preprocessing interface: raw inputs in, graph inputs out, one per modality.

Every model has one preprocessor, chosen by its manifest (``modality`` and
``extra["kind"]``) through :data:`PREPROCESSORS`, never by an if/elif chain.
Implementations sit beside this module: ``text.py`` (tokenizer.json),
``wordvec.py`` (vocabulary lookup, fastText n-grams), ``image.py`` (Pillow
decode, resize, crop, normalise) and ``audio.py`` (soundfile decode,
resample, log-mel front end). They import this interface and register
themselves; this module imports none of them (the choice by manifest is
:func:`embedstream.preprocess.modalities.build_preprocessor`).

Contract:

* ``prepare(inputs)`` takes one batch of raw inputs (``str`` for text
  models, ``bytes`` of an encoded file for image and audio models) and
  returns one result per input, in order: a :class:`Prepared` or the
  :class:`~embedstream.errors.EnvelopeError` that input was rejected with.
  Errors are data here so that one bad input never fails its neighbours.
* ``pack(items)`` stacks prepared items into the graph's inputs (padding as
  the model needs). It never fails for items ``prepare`` returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from embedstream.errors import EnvelopeError
from embedstream.models.manifest import Manifest

if TYPE_CHECKING:
    from embedstream.settings import Settings


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-input limits the preprocessors enforce (from :class:`~embedstream.settings.Settings`)."""

    image_max_pixels: int = 40_000_000
    audio_max_seconds: float = 600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(settings.image_max_pixels, settings.audio_max_seconds)


@dataclass(frozen=True, slots=True)
class Prepared:
    """One input ready for packing.

    ``value`` is the preprocessor's own representation (token ids, a pixel
    array, a spectrogram); ``cost`` is what it weighs in the batch budget
    (tokens for text, frames for audio, 1 per image); ``truncated`` says the
    input was cut to the model's limit.
    """

    value: Any
    cost: int
    truncated: bool = False


class Preprocessor(Protocol):
    modality: str

    def prepare(self, inputs: Sequence[Any]) -> list[Prepared | EnvelopeError]: ...

    def pack(self, items: Sequence[Prepared]) -> dict[str, np.ndarray]: ...


PreprocessorFactory = Callable[[Manifest, Path, Limits], Preprocessor]

# (modality, kind) -> factory; filled by the implementation modules on import.
PREPROCESSORS: dict[tuple[str, str], PreprocessorFactory] = {}


def prepare_each(
    prepare_one: Callable[[Any], Prepared], inputs: Sequence[Any]
) -> list[Prepared | EnvelopeError]:
    """Prepare inputs one by one; a bad one becomes its error, the rest go on."""
    out: list[Prepared | EnvelopeError] = []
    for data in inputs:
        try:
            out.append(prepare_one(data))
        except EnvelopeError as err:
            out.append(err)
    return out


def register(modality: str, kind: str = "") -> Callable[[PreprocessorFactory], PreprocessorFactory]:
    """Class decorator: make a preprocessor available for ``(modality, kind)``."""

    def wrap(factory: PreprocessorFactory) -> PreprocessorFactory:
        PREPROCESSORS[(modality, kind)] = factory
        return factory

    return wrap
