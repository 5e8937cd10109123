"""What the bench does per modality (``--modality``), chosen from :data:`MODALITIES`.

A :class:`Modality` names its rows, how its inputs are generated or read,
what the per-second columns count (tokens for text, seconds of audio for
audio, nothing beyond items for images), its peer and how its default model
is exported on a first run. Everything else (rounds, the pipeline, quality,
targets) is the same for every modality.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedstream.bench import media
from embedstream.bench.inputs import file_texts, generated_texts
from embedstream.bench.rows import PeerRow, Runner, TorchRow, prepare_inputs
from embedstream.errors import BenchError
from embedstream.models.manifest import find_models
from embedstream.runtime.loader import LoadedModel
from embedstream.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Work:
    """What the inputs hold beyond their count: the per-second columns divide it."""

    tokens: int | None = None
    audio_seconds: float | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    """Facts about the inputs for the report's setup (counts, sizes, formats)."""


@dataclass(frozen=True, slots=True)
class Modality:
    rows: tuple[str, ...]
    count_arg: str
    """The CLI argument holding how many inputs to generate."""
    smoke_count: int
    smoke_batch: int
    """Batch size of ``--smoke``: small enough that the pipeline's run spans several batches."""
    generate: Callable[[int, int], list[Any]]
    """``(count, seed) -> inputs``."""
    read_file: Callable[[Path, int | None], list[Any]]
    """``(path, limit) -> inputs``: the user's own."""
    measure: Callable[[LoadedModel, list[Any]], Work]
    peer: Callable[[Path, int, int], Runner]
    """``(model_dir, threads, batch_size) -> the peer row``."""
    reference: str
    default_model: Callable[[Settings], str]
    export_default: Callable[[Path, str], None]
    """Export the default model under a root, or fail naming the model that is missing."""


def _text_work(model: LoadedModel, texts: list[Any]) -> Work:
    tokens = sum(item.cost for item in prepare_inputs(model.preprocessor, texts, model.name))
    return Work(tokens=tokens, facts={
        "texts": len(texts), "tokens": tokens, "mean_tokens": round(tokens / len(texts), 1)})


def _image_work(model: LoadedModel, images: list[Any]) -> Work:
    return Work(facts=media.describe_images(images))


def _audio_work(model: LoadedModel, clips: list[Any]) -> Work:
    facts = media.describe_clips(clips)
    return Work(audio_seconds=facts["audio_seconds"], facts=facts)


def _missing(root: Path, name: str) -> BenchError:
    return BenchError(f"model {name} not found in {root}: export it")


def _export_text(root: Path, name: str) -> None:
    from embedstream.export import DEFAULT_TEXT_NAME, default_text_checkpoint, export_text_model

    if name != DEFAULT_TEXT_NAME:
        raise _missing(root, name)
    export_text_model(default_text_checkpoint(), root, name)


def _export_image(root: Path, name: str) -> None:
    from embedstream.export.image import DEFAULT_IMAGE_NAME, export_image_model

    if name != DEFAULT_IMAGE_NAME:
        raise _missing(root, name)
    export_image_model(None, root)


def _export_audio(root: Path, name: str) -> None:
    from embedstream.export.audio import DEFAULT_AUDIO_NAME, export_audio_model

    if name != DEFAULT_AUDIO_NAME:
        raise _missing(root, name)
    export_audio_model(None, root)


_MEDIA_ROWS = ("peer", "ort-fp32", "pipeline-fp32")
_TORCH_REFERENCE = "peer (the PyTorch fp32 module the model was exported from)"

MODALITIES: dict[str, Modality] = {
    "text": Modality(
        rows=("peer", "ort-fp32", "ort-int8", "pipeline-fp32", "pipeline-int8"),
        count_arg="texts", smoke_count=48, smoke_batch=16,
        generate=generated_texts, read_file=file_texts, measure=_text_work, peer=PeerRow,
        reference="peer (sentence-transformers fp32)",
        default_model=lambda s: s.default_model_for("text"), export_default=_export_text,
    ),
    "image": Modality(
        rows=_MEDIA_ROWS, count_arg="images", smoke_count=16, smoke_batch=4,
        generate=media.generated_images,
        read_file=lambda path, limit: media.file_media(path, "image", limit),
        measure=_image_work, peer=TorchRow, reference=_TORCH_REFERENCE,
        default_model=lambda s: s.default_model_for("image"), export_default=_export_image,
    ),
    "audio": Modality(
        rows=_MEDIA_ROWS, count_arg="clips", smoke_count=16, smoke_batch=4,
        generate=media.generated_clips,
        read_file=lambda path, limit: media.file_media(path, "audio", limit),
        measure=_audio_work, peer=TorchRow, reference=_TORCH_REFERENCE,
        default_model=lambda s: s.default_model_for("audio"), export_default=_export_audio,
    ),
}


def model_dirs(
    settings: Settings, spec: Modality, model: str, rows: tuple[str, ...]
) -> tuple[Path, Path]:
    """The fp32 and int8 model directories, exporting / quantizing what the rows need."""
    if model not in find_models(settings.model_dir):
        spec.export_default(settings.model_dir, model)
    found = find_models(settings.model_dir)
    fp32_dir = found[model]
    int8_name = f"{model}-int8"
    needs_int8 = any(r.endswith("int8") for r in rows)
    if needs_int8 and int8_name not in found:
        from embedstream.export.optimize import quantize_int8

        log.info("quantizing %s to int8 (first run only)", model)
        quantize_int8(fp32_dir, int8_name)
    return fp32_dir, settings.model_dir / int8_name
