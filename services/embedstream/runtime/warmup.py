"""Warm-up: one batch of the largest shape the budgets allow, before consuming.

ONNX Runtime's CPU arena (and a GPU's memory pool) grows to the largest batch
it has run and keeps that memory. Without a warm-up that happens the first
time a burst packs a full batch of long inputs: minutes or hours into a run,
as a step in memory (or an out-of-memory kill) and a slow batch. With it, the
worker reaches the high-water mark of one batch at startup, where a budget too
large for the node fails at once. The CPU arena is one per process, shared by
every model and by the inference threads that share a model's session
(:func:`~embedstream.runtime.onnx.shared_cpu_arena`): when two threads run a
batch of the largest shape at the same moment, it grows once more, to at most
one such batch per inference thread.

The inputs are synthetic and go through the model's own preprocessor, so the
shapes are the ones real events produce: text at the model's token limit,
images at the model's input size, audio clips of ``_AUDIO_SECONDS``.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from embedstream.preprocess.base import Prepared
from embedstream.runtime.loader import LoadedModel
from embedstream.runtime.memory import grew, rss_mb

log = logging.getLogger(__name__)

_AUDIO_SECONDS = 10.0
"""Clip length of the audio warm-up; longer clips (up to the audio limit) may still grow memory."""


def _texts(count: int) -> list[Any]:
    # Longer than any model's token limit (each comes out truncated to it), and
    # words every vocabulary has, word-vector tables included.
    return [" ".join(["the", "of", "and", "to", "in", "a"] * 342)] * count


def _images(count: int) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    pixels = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return [buffer.getvalue()] * count


def _audio(count: int) -> list[Any]:
    import soundfile

    rate = 16_000
    noise = np.random.default_rng(0).normal(0, 0.1, int(rate * _AUDIO_SECONDS))
    buffer = io.BytesIO()
    soundfile.write(buffer, noise.astype(np.float32), rate, format="WAV")
    return [buffer.getvalue()] * count


_INPUTS: dict[str, Callable[[int], list[Any]]] = {
    "text": _texts, "image": _images, "audio": _audio,
}


def probe_input(model: LoadedModel) -> Prepared | None:
    """One known-good input of the model's modality, preprocessed; None when there is none.

    The worker runs it when every item of a batch failed, to tell a broken model
    (the probe fails too: about the world) from a batch of bad inputs.
    """
    make = _INPUTS.get(model.modality)
    if make is None:
        return None
    probe = model.preprocessor.prepare(make(1))[0]
    return probe if isinstance(probe, Prepared) else None


def warm_up(model: LoadedModel, max_items: int, max_tokens: int) -> tuple[int, int]:
    """Run one batch of the largest shape ``max_items`` / ``max_tokens`` allow.

    Returns (items, cost of each), (0, 0) when the modality has no synthetic
    input or the preprocessor rejects it. Raises :class:`ModelError` when the
    model cannot run that batch (out of memory, a broken graph): better at
    startup than with events in flight.
    """
    probe = probe_input(model)
    if probe is None:  # no synthetic input, or a vocabulary without these words: not fatal
        log.warning("no warm-up for %s: no input of its modality that it accepts", model.name)
        return 0, 0
    count = max(1, min(max_items, max_tokens // max(1, probe.cost)))
    started, before = time.perf_counter(), rss_mb()
    if model.token_mode:
        model.embed_prepared_tokens([probe] * count)
    else:
        model.embed_prepared([probe] * count)
    after = rss_mb()
    if before is not None and after is not None:
        model.warmup_mb = after - before
    log.info("warmed up %s: %d x %d in %.2fs, %s", model.name, count, probe.cost,
             time.perf_counter() - started, grew(before, after))
    return count, probe.cost
