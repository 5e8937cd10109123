"""In-process bench rows: the peer (sentence-transformers) and the raw ONNX Runtime model.

Both see the same texts, batch size and threads, and both sort by length
before batching (sentence-transformers' ``encode`` does it itself), so the
difference between them is the runtime, not the padding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedstream.errors import BenchError
from embedstream.models.manifest import load_manifest
from embedstream.runtime.loader import LoadedModel, load_model
from embedstream.runtime.preprocess import Prepared


@dataclass(frozen=True, slots=True)
class Timed:
    """Vectors of one pass over the inputs, in input order, and its wall time."""

    vectors: np.ndarray
    seconds: float


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


def prepare_texts(model: LoadedModel, texts: list[str]) -> list[Prepared]:
    """Tokenize with the model's own preprocessor; every bench text must be valid."""
    items = model.preprocessor.prepare(texts)
    bad = [item for item in items if not isinstance(item, Prepared)]
    if bad:
        raise BenchError(f"{len(bad)} bench texts rejected by {model.name}: {bad[0]}")
    return [item for item in items if isinstance(item, Prepared)]


class OrtRow:
    """The exported graph alone: tokenize, length-sorted batches, ``session.run``."""

    def __init__(self, model_dir: Path, threads: int, batch_size: int) -> None:
        self.model: LoadedModel = load_model(model_dir, providers=[], threads=threads)
        if self.model.manifest.modality != "text":
            raise BenchError(f"{self.model.name} is not a text model")
        self._batch_size = batch_size

    def run(self, texts: list[str]) -> Timed:
        started = time.perf_counter()
        items = prepare_texts(self.model, texts)
        order = sorted(range(len(texts)), key=lambda i: items[i].cost)
        out = np.empty((len(texts), self.model.manifest.dimension), dtype=np.float32)
        for start in range(0, len(order), self._batch_size):
            chunk = order[start : start + self._batch_size]
            out[chunk] = self.model.embed_prepared([items[i] for i in chunk])
        return Timed(out, time.perf_counter() - started)
