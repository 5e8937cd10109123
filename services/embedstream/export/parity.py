"""Parity of an exported text model with sentence-transformers.

The ONNX side runs as the worker would: ``tokenizer.json`` through the
``tokenizers`` library, truncated to ``max_length``, right-padded to the
longest text of each batch, then ONNX Runtime on CPU. The reference is
sentence-transformers on the original checkpoint, with the pooling and
normalisation the manifest declares.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from embedstream.errors import ExportError
from embedstream.export.checkpoint import read_text_checkpoint
from embedstream.models.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

# fp32 export of the same weights: anything below this is a real difference
# (pooling, masking, tokenisation), not rounding.
PARITY_MIN_COSINE = 0.9999

# Checked after every export: short and long, cased and accented, non-Latin,
# emoji, numbers, and one text far beyond any limit to exercise truncation.
PARITY_SENTENCES: tuple[str, ...] = (
    "hello world",
    "How do I reset my password?",
    "The QUICK brown Fox jumps over the lazy dog.",
    "Crème brûlée, café au lait and a naïve résumé.",
    "Москва, 東京 and القاهرة are capital cities 🌍🚀",
    "Order #4521 shipped on 2024-03-15 for $1,299.99",
    " ".join(["Streaming embeddings keep the search index fresh as events arrive."] * 60),
    "",
)


@dataclass(frozen=True, slots=True)
class ParityReport:
    """Cosine similarity of ONNX and reference embeddings, one per sentence."""

    cosines: tuple[float, ...]
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    """Largest element-wise difference, on the scale the manifest declares."""

    def passed(self, threshold: float = PARITY_MIN_COSINE) -> bool:
        return self.min_cosine >= threshold


def check_parity(
    model_dir: Path, checkpoint: Path | str, sentences: list[str], *, batch_size: int = 8
) -> ParityReport:
    """Embed ``sentences`` with the model in ``model_dir`` and with ``checkpoint``; compare.

    Raises :class:`ExportError` when either side cannot be loaded. Judging the
    figures is the caller's business (:meth:`ParityReport.passed`).
    """
    if not sentences:
        raise ExportError("parity needs at least one sentence")
    manifest = load_manifest(model_dir)
    actual = encode_onnx(model_dir, manifest, sentences, batch_size=batch_size)
    expected = _encode_reference(checkpoint, manifest, sentences, batch_size)
    dot = np.sum(actual * expected, axis=1)
    norms = np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    cosines = dot / np.maximum(norms, 1e-12)
    return ParityReport(
        cosines=tuple(float(c) for c in cosines),
        min_cosine=float(cosines.min()),
        mean_cosine=float(cosines.mean()),
        max_abs_diff=float(np.abs(actual - expected).max()),
    )


def encode_onnx(
    model_dir: Path, manifest: Manifest, sentences: list[str], *, batch_size: int = 8
) -> np.ndarray:
    """``[len(sentences), dimension]`` float32 embeddings from the exported graph."""
    tokenizer = Tokenizer.from_file(str(model_dir / manifest.tokenizer_files[0]))
    tokenizer.enable_truncation(manifest.max_length)
    tokenizer.enable_padding(
        pad_id=int(manifest.extra.get("pad_token_id", 0)),
        pad_token=str(manifest.extra.get("pad_token", "[PAD]")),
    )
    session = ort.InferenceSession(
        str(manifest.onnx_path(model_dir)), providers=["CPUExecutionProvider"]
    )
    batches = []
    for start in range(0, len(sentences), batch_size):
        encodings = tokenizer.encode_batch(sentences[start : start + batch_size])
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        outputs = session.run(["embedding"], {n: feeds[n] for n in manifest.inputs})
        batches.append(np.asarray(outputs[0], dtype=np.float32))
    return np.concatenate(batches)


def _encode_reference(
    checkpoint: Path | str, manifest: Manifest, sentences: list[str], batch_size: int
) -> np.ndarray:
    model = reference_model(checkpoint, manifest)
    try:
        vectors = model.encode(
            sentences, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
        )
    except Exception as err:
        raise ExportError(f"sentence-transformers failed on {checkpoint}: {err}") from err
    return np.asarray(vectors, dtype=np.float32)


def reference_model(checkpoint: Path | str, manifest: Manifest) -> Any:
    """sentence-transformers as the checkpoint says, or as the manifest says when they differ.

    A sentence-transformers checkpoint whose pooling and normalisation were
    not overridden loads as itself, so its own configuration is the reference.
    """
    from sentence_transformers import SentenceTransformer

    Transformer, Pooling, Normalize = st_modules()
    ckpt = read_text_checkpoint(checkpoint)
    as_declared = (
        ckpt.sentence_transformers
        and (ckpt.pooling or "mean") == manifest.pooling
        and bool(ckpt.normalize) == manifest.normalize
    )
    try:
        if as_declared:
            model = SentenceTransformer(str(ckpt.path), device="cpu")
        else:
            modules = [
                Transformer(str(ckpt.transformer_path), do_lower_case=ckpt.do_lower_case),
                Pooling(manifest.dimension, pooling_mode=manifest.pooling),
            ]
            if manifest.normalize:
                modules.append(Normalize())
            model = SentenceTransformer(modules=modules, device="cpu")
    except Exception as err:
        raise ExportError(f"sentence-transformers cannot load {ckpt.source}: {err}") from err
    model.max_seq_length = manifest.max_length
    return model


def st_modules() -> tuple[Any, Any, Any]:
    """sentence-transformers' ``Transformer``, ``Pooling`` and ``Normalize`` module classes."""
    try:
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import (  # type: ignore[no-redef]
            Normalize,
            Pooling,
            Transformer,
        )
    return Transformer, Pooling, Normalize
