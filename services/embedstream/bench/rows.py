"""In-process bench rows: the peer and the raw ONNX Runtime model.

The peer is what a user would run instead: sentence-transformers ``encode``
for text models, and for image and audio models the PyTorch module the
model was exported from (the reference of the export parity check), fed by
the runtime's own numpy preprocessing. Every row sees the same inputs, batch
size and threads, sorts by cost before batching (sentence-transformers'
``encode`` does it itself) and times the whole pass, preprocessing included
(tokenizing; decoding, resizing, resampling, spectrograms), so the
difference between them is the inference runtime, not the padding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embedstream.errors import BenchError
from embedstream.models.manifest import Manifest, load_manifest
from embedstream.preprocess.base import Limits, Prepared, Preprocessor
from embedstream.preprocess.modalities import build_preprocessor
from embedstream.runtime.loader import LoadedModel, load_model


@dataclass(frozen=True, slots=True)
class Timed:
    """Vectors of one pass over the inputs, in input order, and its wall time."""

    vectors: np.ndarray
    seconds: float
    prepare_seconds: float | None = None
    """The preprocessing share of ``seconds``, where the row can tell it apart."""


class Runner(Protocol):
    """An in-process row: one timed pass over all inputs."""

    def run(self, inputs: list[Any]) -> Timed: ...


class PeerRow:
    """sentence-transformers ``encode`` on the checkpoint the model was exported from."""

    def __init__(self, model_dir: Path, threads: int, batch_size: int) -> None:
        try:
            import torch

            from embedstream.export.parity import reference_model
        except ImportError as err:
            raise BenchError(
                "the peer row needs sentence-transformers (torch): "
                "pip install 'embedstream[export]', or leave the row out with --rows"
            ) from err
        manifest = load_manifest(model_dir)
        torch.set_num_threads(threads)
        self._model: Any = reference_model(manifest.source, manifest)
        self._batch_size = batch_size

    def run(self, texts: list[str]) -> Timed:
        started = time.perf_counter()
        vectors = self._model.encode(
            texts, batch_size=self._batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return Timed(np.asarray(vectors, dtype=np.float32), time.perf_counter() - started)


def prepare_inputs(preprocessor: Preprocessor, inputs: Sequence[Any], model: str) -> list[Prepared]:
    """Preprocess with the model's own preprocessor; every bench input must be valid."""
    items = preprocessor.prepare(inputs)
    bad = [item for item in items if not isinstance(item, Prepared)]
    if bad:
        raise BenchError(f"{len(bad)} bench inputs rejected by {model}: {bad[0]}")
    return [item for item in items if isinstance(item, Prepared)]


def embed_sorted(
    items: list[Prepared], batch_size: int, dimension: int,
    embed: Callable[[list[Prepared]], np.ndarray],
) -> np.ndarray:
    """``embed`` over cost-sorted batches of ``items``; the vectors in the items' order."""
    order = sorted(range(len(items)), key=lambda i: items[i].cost)
    out = np.empty((len(items), dimension), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out[chunk] = embed([items[i] for i in chunk])
    return out


class OrtRow:
    """The exported graph alone: preprocess, cost-sorted batches, ``session.run``."""

    def __init__(self, model_dir: Path, threads: int, batch_size: int, modality: str) -> None:
        self.model: LoadedModel = load_model(model_dir, providers=[], threads=threads)
        if self.model.modality != modality:
            raise BenchError(f"{self.model.name} is a {self.model.modality} model, "
                             f"not a {modality} one")
        self._batch_size = batch_size
        self.padded_cost = 0
        """Padded cost (tokens for text) of its batches in the last run: items x costliest."""

    def run(self, inputs: list[Any]) -> Timed:
        started = time.perf_counter()
        items = prepare_inputs(self.model.preprocessor, inputs, self.model.name)
        prepared = time.perf_counter()
        costs = sorted(item.cost for item in items)
        self.padded_cost = sum(
            max(costs[i : i + self._batch_size]) * len(costs[i : i + self._batch_size])
            for i in range(0, len(costs), self._batch_size))
        out = embed_sorted(items, self._batch_size, self.model.manifest.dimension,
                           self.model.embed_prepared)
        ended = time.perf_counter()
        return Timed(out, ended - started, prepared - started)


class TorchRow:
    """The PyTorch module an image or audio model was exported from, on the same inputs.

    The module is rebuilt by the model's export family (``extra["family"]``)
    from its ``source``, exactly as the export parity check builds its
    reference, and fed the graph inputs the runtime's preprocessor makes.
    """

    def __init__(self, model_dir: Path, threads: int, batch_size: int) -> None:
        try:
            import torch

            from embedstream.export.common import torch_embed
        except ImportError as err:
            raise BenchError(
                "the peer row needs torch: pip install 'embedstream[export]', "
                "or leave the row out with --rows"
            ) from err
        manifest = load_manifest(model_dir)
        torch.set_num_threads(threads)
        self._module = _reference_module(manifest)
        self._preprocessor = build_preprocessor(manifest, model_dir, Limits())
        self._manifest = manifest
        self._batch_size = batch_size
        self._torch_embed = torch_embed

    def run(self, inputs: list[Any]) -> Timed:
        started = time.perf_counter()
        items = prepare_inputs(self._preprocessor, inputs, self._manifest.name)
        prepared = time.perf_counter()
        out = embed_sorted(items, self._batch_size, self._manifest.dimension, self._embed)
        ended = time.perf_counter()
        return Timed(out, ended - started, prepared - started)

    def _embed(self, items: list[Prepared]) -> np.ndarray:
        feeds = self._preprocessor.pack(items)
        vectors: np.ndarray = self._torch_embed(
            self._module, *(feeds[name] for name in self._manifest.inputs))
        return vectors


def _reference_module(manifest: Manifest) -> Any:
    from embedstream.export import audio, image

    references = {"image": image.reference_module, "audio": audio.reference_module}
    try:
        return references[manifest.modality](manifest)
    except KeyError as err:
        raise BenchError(f"no PyTorch reference for {manifest.modality} models") from err
