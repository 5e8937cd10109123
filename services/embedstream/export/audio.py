"""Export audio encoders to ONNX model directories (``embedstream export --kind audio``).

Families, chosen by name through :data:`AUDIO_FAMILIES`:

``aisfx`` (the default)
    The aiSFX sound-effects CNN (ISMIR 2022, weights CC BY 4.0, shipped by
    the ``aisfx`` package): 512-d per ~2.3 s block of log-mel frames,
    mean-pooled over the clip's blocks inside the graph.
``transformers``
    A transformers audio checkpoint: wav2vec2 / HuBERT / WavLM (waveform
    input, hidden states mean-pooled over the real frames) or a Whisper
    encoder (log-mel input, mean over frames).

The runtime computes every front end in numpy (:mod:`embedstream.preprocess.audio`);
the export checks the ONNX graph against the PyTorch module on clips decoded
and preprocessed by that same code (cosine >= 0.9999).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from embedstream.errors import ExportError
from embedstream.export.common import (
    ONNX_FILE,
    check_name,
    export_onnx,
    family_reference,
    pick_family,
    require_parity,
    runtime_parity,
    staged_export,
    write_manifest,
)
from embedstream.models.manifest import Manifest

log = logging.getLogger(__name__)

DEFAULT_AUDIO_NAME = "aisfx"
_AISFX_FRONTEND = {
    "frontend": "aisfx_blocks", "sample_rate": 44100, "n_fft": 2048, "hop_length": 1024,
    "n_mels": 96, "fmin": 0.0, "fmax": 22050.0, "htk": True, "mel_norm": 1.0,
    "norm_min": 0.0, "norm_max": 9.457798957824707, "block_frames": 100, "block_hop": 50,
}


@dataclass
class AudioSource:
    module: torch.nn.Module
    frontend: dict[str, Any]
    inputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    source: str
    default_name: str
    family: str


class BlockPooledEncoder(torch.nn.Module):
    """``features [B, N, T, F], block_mask [B, N] -> [B, dim]``: embed blocks, mean the real ones."""

    def __init__(self, block_net: torch.nn.Module) -> None:
        super().__init__()
        self.block_net = block_net

    def forward(self, features: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
        batch, blocks = features.shape[0], features.shape[1]
        flat = features.reshape(batch * blocks, features.shape[2], features.shape[3])
        embedded = self.block_net(flat).reshape(batch, blocks, -1)
        mask = block_mask.unsqueeze(-1)
        pooled = (embedded * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, p=2.0, dim=1)


def _aisfx(checkpoint: str | None) -> AudioSource:
    try:
        from aisfx.inference import get_path_modelWeights
        from aisfx.models.cnn2d import CrossNet, EmbeddingNet
    except ImportError as err:
        raise ExportError("the aiSFX model needs the aisfx package: "
                          "pip install --no-deps aisfx") from err
    from numpy._core.multiarray import scalar

    path = checkpoint or get_path_modelWeights()
    # The checkpoint is (state_dict, {dataset: (index, classes)}) with numpy
    # scalars inside: allow exactly those, keep weights_only loading.
    allowed: list[Any] = [(scalar, "numpy.core.multiarray.scalar"), np.dtype, np.dtypes.Int64DType]
    with torch.serialization.safe_globals(allowed):
        weights, datasets = torch.load(path, map_location="cpu", weights_only=True)
    net = CrossNet(EmbeddingNet("max", 3, 1, 64), datasets, "cpu")
    net.load_state_dict(weights)
    encoder = BlockPooledEncoder(net.embedding_net).eval()
    axes = {"features": {0: "batch", 1: "blocks"}, "block_mask": {0: "batch", 1: "blocks"}}
    return AudioSource(encoder, dict(_AISFX_FRONTEND), ["features", "block_mask"], axes,
                       str(path), DEFAULT_AUDIO_NAME, "aisfx")


class WaveformPooledEncoder(torch.nn.Module):
    """wav2vec2-style: hidden states mean-pooled over the frames the mask keeps."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_values, attention_mask=attention_mask).last_hidden_state
        frames = self.model._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)
        mask = frames.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, p=2.0, dim=1)


class WhisperPooledEncoder(torch.nn.Module):
    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_features).last_hidden_state
        return F.normalize(hidden.mean(dim=1), p=2.0, dim=1)


def _transformers_audio(checkpoint: str | None) -> AudioSource:
    if checkpoint is None:
        raise ExportError("the transformers audio family needs a checkpoint directory")
    from transformers import AutoConfig, AutoModel

    path = Path(checkpoint)
    config = AutoConfig.from_pretrained(str(path))
    kind = str(config.model_type)
    prep_path = path / "preprocessor_config.json"
    prep = json.loads(prep_path.read_text("utf-8")) if prep_path.is_file() else {}
    rate = int(prep.get("sampling_rate", 16000))
    try:
        model = AutoModel.from_pretrained(str(path)).float().eval()
    except Exception as err:
        raise ExportError(f"cannot load a transformers audio model from {path}: {err}") from err
    name = path.name.lower().replace("_", "-")
    if kind == "whisper":
        frames = 2 * int(config.max_source_positions)
        hop = int(prep.get("hop_length", 160))
        frontend = {"frontend": "whisper_logmel", "sample_rate": rate,
                    "n_fft": int(prep.get("n_fft", 400)), "hop_length": hop,
                    "n_mels": int(config.num_mel_bins), "chunk_seconds": frames * hop / rate}
        return AudioSource(WhisperPooledEncoder(model.get_encoder()).eval(), frontend,
                           ["input_features"], {"input_features": {0: "batch"}}, str(path), name,
                           f"transformers/{kind}")
    if not hasattr(model, "_get_feature_vector_attention_mask"):
        raise ExportError(f"transformers audio model type {kind!r} is not supported "
                          "(wav2vec2, HuBERT, WavLM, Whisper are)")
    frontend = {"frontend": "waveform", "sample_rate": rate,
                "do_normalize": bool(prep.get("do_normalize", True)),
                "frame_samples": int(np.prod(config.conv_stride)), "min_samples": 400}
    axes = {n: {0: "batch", 1: "samples"} for n in ("input_values", "attention_mask")}
    return AudioSource(WaveformPooledEncoder(model).eval(), frontend,
                       ["input_values", "attention_mask"], axes, str(path), name,
                       f"transformers/{kind}")


AUDIO_FAMILIES: dict[str, Callable[[str | None], AudioSource]] = {
    "aisfx": _aisfx,
    "transformers": _transformers_audio,
}


def reference_module(manifest: Manifest) -> torch.nn.Module:
    """The PyTorch module an exported audio model came from (its parity reference)."""
    return family_reference(AUDIO_FAMILIES, manifest, "audio")


def sample_clips(seconds: float = 3.0) -> list[bytes]:
    """Deterministic test clips as files (WAV, FLAC, OGG; mono and stereo; several rates)."""
    import soundfile as sf

    rng = np.random.default_rng(7)
    clips = []
    for i, (rate, fmt) in enumerate(((22050, "WAV"), (44100, "FLAC"), (16000, "WAV"),
                                     (48000, "OGG"), (32000, "FLAC"))):
        t = np.arange(int(seconds * rate)) / rate
        signal = {
            0: np.sin(2 * np.pi * 440 * t),
            1: np.sin(2 * np.pi * (200 + 1500 * t / seconds) * t),
            2: rng.normal(0, 0.3, t.shape) * np.exp(-3 * (t % 0.5)),
            3: 0.5 * np.sign(np.sin(2 * np.pi * 3 * t)) * rng.normal(0, 0.2, t.shape),
            4: np.sin(2 * np.pi * 880 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t)),
        }[i].astype(np.float32)
        data = np.stack([signal, 0.5 * signal], axis=1) if i % 2 else signal
        buffer = io.BytesIO()
        sf.write(buffer, data, rate, format=fmt)
        clips.append(buffer.getvalue())
    return clips



def export_audio_model(
    checkpoint: str | Path | None,
    out_root: Path,
    name: str | None = None,
    *,
    family: str = "aisfx",
    opset: int = 17,
    overwrite: bool = False,
) -> Path:
    """Export an audio encoder to ``out_root/<name>/``; return that directory."""
    loader = pick_family(AUDIO_FAMILIES, family, "audio")
    src = loader(str(checkpoint) if checkpoint else None)
    name = check_name(name or src.default_name)
    with staged_export(out_root, name, overwrite) as staging:
        # Trace with inputs the runtime makes from real clips: right shapes and dtypes.
        dummy_feeds = _feeds(name, src, sample_clips(1.5)[:2])
        args = tuple(torch.from_numpy(dummy_feeds[n]) for n in src.inputs)
        with torch.no_grad():
            dimension = int(src.module(*args).shape[-1])
        export_onnx(src.module, args, src.inputs, src.dynamic_axes, staging / ONNX_FILE, opset)
        write_manifest(staging, name=name, modality="audio", dimension=dimension, pooling="mean",
                       normalize=True, inputs=src.inputs, opset=opset, source=src.source,
                       extra={**src.frontend, "family": src.family})
        parity = runtime_parity(staging, src.module, sample_clips())
        require_parity(name, parity, "clips")
    log.info("exported %s (%s, %d-d) to %s", name, src.family, dimension, Path(out_root) / name)
    return Path(out_root) / name


def _feeds(name: str, src: AudioSource, clips: list[bytes]) -> dict[str, np.ndarray]:
    """Graph inputs for ``clips`` from the runtime's preprocessor, before any graph exists."""
    from embedstream.models.manifest import Manifest
    from embedstream.preprocess.audio import AudioPreprocessor

    manifest = Manifest(name=name, modality="audio", dimension=1, pooling="mean", normalize=True,
                        inputs=src.inputs, opset=17, sha256="-", max_length=0, source="",
                        extra=src.frontend)
    prep = AudioPreprocessor(manifest, Path("."))
    return prep.pack([prep.prepare_one(c) for c in clips])
