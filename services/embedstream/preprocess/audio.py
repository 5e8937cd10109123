"""Audio preprocessing: decode, downmix, resample, front end, all in numpy.

Decoding is soundfile (libsndfile: WAV, FLAC, OGG/Vorbis, Opus, and MP3
where the bundled libsndfile has it). Channels are averaged to mono and the
signal is resampled (polyphase, ``scipy.signal.resample_poly``) to the
model's ``sample_rate``. The model's front end turns the waveform into graph
inputs; front ends are chosen by ``extra["frontend"]`` through
:data:`FRONTENDS`:

``aisfx_blocks``
    The aiSFX sound-effects CNN's input: peak-normalised audio, power
    mel spectrogram (HTK mel, L1-normalised filters, reflect-padded centred
    frames as librosa 0.9 computes them), ``log10(1e4 * S + 1)``,
    min/max scaled, cut into blocks of ``block_frames`` frames every
    ``block_hop`` frames. Inputs ``features`` ``[batch, blocks, frames,
    n_mels]`` and ``block_mask`` ``[batch, blocks]``; the graph embeds each
    block and mean-pools the real ones (pooling over time).
``waveform``
    Raw samples for wav2vec2 / HuBERT style encoders: inputs
    ``input_values`` ``[batch, samples]`` (zero mean, unit variance when
    ``do_normalize``) and ``attention_mask``; the graph pools over time.
``whisper_logmel``
    Whisper's log-mel (``n_fft`` 400, hop 160, Slaney mel, clamp to max-8,
    ``(x + 4) / 4``), padded or cut to ``chunk_seconds``: input
    ``input_features`` ``[batch, n_mels, frames]``.

The cost of a clip in the batch budget is its frame count.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from embedstream.errors import ConfigError, EnvelopeError
from embedstream.models.manifest import Manifest
from embedstream.preprocess.base import Limits, Prepared, prepare_each, register

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- decoding
def decode_audio(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their rate. Raises :class:`EnvelopeError`.

    The duration is checked from the header before the samples are read, so
    an over-long file costs no decoding.
    """
    if not data:
        raise EnvelopeError("audio_empty", "the audio is empty (0 bytes)")
    missing = _wav_missing_bytes(data)
    if missing:
        raise EnvelopeError("invalid_audio", f"truncated WAV: {missing} bytes of samples missing")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, frames = int(f.samplerate), int(f.frames)
            if frames <= 0 and f.format not in ("MPEG", "OGG"):  # some codecs report 0 up front
                raise EnvelopeError("audio_empty", "the audio has no samples")
            if rate > 0 and frames / rate > max_seconds:
                raise EnvelopeError(
                    "audio_too_long", f"{frames / rate:.1f}s, limit {max_seconds:.0f}s"
                )
            samples = f.read(dtype="float32", always_2d=True)
    except EnvelopeError:
        raise
    except sf.LibsndfileError as err:
        message = str(err)
        reason = "unsupported_format" if "Format not recognised" in message else "invalid_audio"
        raise EnvelopeError(reason, f"cannot decode audio: {message}") from err
    except Exception as err:  # soundfile raises RuntimeError/TypeError on odd input
        raise EnvelopeError("invalid_audio", f"cannot decode audio: {err}") from err
    if samples.shape[0] == 0:
        raise EnvelopeError("audio_empty", "the audio has no samples")
    if samples.shape[0] / rate > max_seconds:
        raise EnvelopeError("audio_too_long", f"{samples.shape[0] / rate:.1f}s, limit {max_seconds}")
    mono = samples.mean(axis=1)
    if not np.isfinite(mono).all():
        raise EnvelopeError("invalid_audio", "the audio holds NaN or infinite samples")
    return mono.astype(np.float32), rate


def _wav_missing_bytes(data: bytes) -> int:
    """Bytes a RIFF/WAVE file's data chunk declares but lacks (libsndfile reads short files silently)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return 0
    at = data.find(b"data", 12)
    if at < 0 or at + 8 > len(data):
        return 0
    declared = int.from_bytes(data[at + 4 : at + 8], "little")
    if declared in (0, 0xFFFFFFFF):  # streaming writers leave the size open
        return 0
    return max(0, declared - (len(data) - at - 8))


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling to ``target`` Hz (anti-aliased)."""
    if rate == target:
        return wave
    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return np.asarray(resample_poly(wave, target // g, rate // g), dtype=np.float32)


# ----------------------------------------------------------- spectrograms
def hz_to_mel(freq: np.ndarray, htk: bool) -> np.ndarray:
    freq = np.asarray(freq, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + freq / 700.0)
    # Slaney: linear below 1 kHz, logarithmic above.
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mels = freq / f_sp
    log_part = min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hz) / logstep
    return np.where(freq >= min_log_hz, log_part, mels)


def mel_to_hz(mels: np.ndarray, htk: bool) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(
        mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels
    )


def mel_filters(
    rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float, *, htk: bool, norm: Any
) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` triangular filters, as ``librosa.filters.mel`` builds them.

    ``norm``: ``"slaney"`` (equal area), a number p (unit L^p norm per
    filter) or ``None``.
    """
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    mel_points = mel_to_hz(
        np.linspace(hz_to_mel(np.array(fmin), htk), hz_to_mel(np.array(fmax), htk), n_mels + 2), htk
    )
    fdiff = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= (2.0 / (mel_points[2 : n_mels + 2] - mel_points[:n_mels]))[:, None]
    elif norm is not None:
        p = float(norm)
        weights /= np.maximum((np.abs(weights) ** p).sum(axis=1, keepdims=True) ** (1 / p), 1e-10)
    return weights.astype(np.float32)


def power_spectrogram(wave: np.ndarray, n_fft: int, hop: int, win: int | None = None) -> np.ndarray:
    """``[frames, n_fft // 2 + 1]`` |STFT|^2: centred frames with reflect padding (as librosa
    0.9, which aiSFX was trained with, and Whisper use), periodic Hann window."""
    win = win or n_fft
    half = n_fft // 2
    if wave.shape[0] > half:
        padded = np.pad(wave.astype(np.float32), (half, half), mode="reflect")
    else:  # too short to reflect
        padded = np.pad(wave.astype(np.float32), (half, half))
    if padded.shape[0] < n_fft:
        padded = np.pad(padded, (0, n_fft - padded.shape[0]))
    frames = 1 + (padded.shape[0] - n_fft) // hop
    window = np.zeros(n_fft, np.float32)
    start = (n_fft - win) // 2
    window[start : start + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    strided = np.lib.stride_tricks.as_strided(
        padded, shape=(frames, n_fft), strides=(padded.strides[0] * hop, padded.strides[0])
    )
    spectrum = np.fft.rfft(strided * window, axis=1)
    return (spectrum.real**2 + spectrum.imag**2).astype(np.float32)


# ------------------------------------------------------------- front ends
class FrontEnd:
    """Waveform (mono, at the model's rate) to one item; items to graph inputs."""

    def features(self, wave: np.ndarray) -> Prepared:
        raise NotImplementedError

    def pack(self, items: Sequence[Prepared]) -> dict[str, np.ndarray]:
        raise NotImplementedError


class AisfxBlocks(FrontEnd):
    def __init__(self, extra: dict[str, Any]) -> None:
        self.rate = int(extra["sample_rate"])
        self.n_fft, self.hop = int(extra["n_fft"]), int(extra["hop_length"])
        self.block, self.block_hop = int(extra["block_frames"]), int(extra["block_hop"])
        self.norm_min, self.norm_max = float(extra["norm_min"]), float(extra["norm_max"])
        self.filters = mel_filters(
            self.rate, self.n_fft, int(extra["n_mels"]), float(extra.get("fmin", 0.0)),
            float(extra.get("fmax", self.rate / 2)), htk=bool(extra.get("htk", True)),
            norm=extra.get("mel_norm", 1.0),
        )

    def spectrogram(self, wave: np.ndarray) -> np.ndarray:
        """``[frames, n_mels]`` scaled log-mel."""
        peak = float(np.abs(wave).max()) or 1.0
        power = power_spectrogram(wave / peak, self.n_fft, self.hop)
        mel = power @ self.filters.T
        log_mel = np.log10(mel * 10000.0 + 1.0)
        return ((log_mel - self.norm_min) / (self.norm_max - self.norm_min)).astype(np.float32)

    def blocks(self, spec: np.ndarray) -> np.ndarray:
        """``[blocks, block_frames, n_mels]``: aiSFX's blocking, dropping a partial last block."""
        frames = spec.shape[0]
        count = max(1, (frames - self.block) // self.block_hop + 1) if frames >= self.block else 1
        padded = np.vstack([spec, np.zeros((self.block, spec.shape[1]), np.float32)])
        return np.stack(
            [padded[i * self.block_hop : i * self.block_hop + self.block] for i in range(count)]
        )

    def features(self, wave: np.ndarray) -> Prepared:
        blocks = self.blocks(self.spectrogram(wave))
        return Prepared(blocks, blocks.shape[0] * self.block)

    def pack(self, items: Sequence[Prepared]) -> dict[str, np.ndarray]:
        features, mask = _pad_rows(items, np.float32)
        return {"features": features, "block_mask": mask}


def _pad_rows(items: Sequence[Prepared], mask_dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Items' float32 values zero-padded along their first axis to the longest, and the
    mask of real positions (1) against padding (0), in ``mask_dtype``."""
    longest = max(item.value.shape[0] for item in items)
    values = np.zeros((len(items), longest, *items[0].value.shape[1:]), np.float32)
    mask = np.zeros((len(items), longest), mask_dtype)
    for row, item in enumerate(items):
        values[row, : item.value.shape[0]] = item.value
        mask[row, : item.value.shape[0]] = 1
    return values, mask


class Waveform(FrontEnd):
    def __init__(self, extra: dict[str, Any]) -> None:
        self.normalize = bool(extra.get("do_normalize", True))
        self.frame = int(extra.get("frame_samples", 320))
        self.min_samples = int(extra.get("min_samples", 400))

    def features(self, wave: np.ndarray) -> Prepared:
        if wave.shape[0] < self.min_samples:
            wave = np.pad(wave, (0, self.min_samples - wave.shape[0]))
        if self.normalize:
            wave = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
        return Prepared(wave.astype(np.float32), max(1, wave.shape[0] // self.frame))

    def pack(self, items: Sequence[Prepared]) -> dict[str, np.ndarray]:
        values, mask = _pad_rows(items, np.int64)
        return {"input_values": values, "attention_mask": mask}


class WhisperLogMel(FrontEnd):
    def __init__(self, extra: dict[str, Any]) -> None:
        self.rate = int(extra["sample_rate"])
        self.n_fft, self.hop = int(extra.get("n_fft", 400)), int(extra.get("hop_length", 160))
        self.samples = int(float(extra.get("chunk_seconds", 30)) * self.rate)
        self.filters = mel_filters(
            self.rate, self.n_fft, int(extra["n_mels"]), 0.0, self.rate / 2, htk=False, norm="slaney"
        )

    def features(self, wave: np.ndarray) -> Prepared:
        wave = np.pad(wave[: self.samples], (0, max(0, self.samples - wave.shape[0])))
        power = power_spectrogram(wave, self.n_fft, self.hop)[:-1]
        log_spec = np.log10(np.maximum(power @ self.filters.T, 1e-10))
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        return Prepared(((log_spec + 4.0) / 4.0).T.astype(np.float32), log_spec.shape[0])

    def pack(self, items: Sequence[Prepared]) -> dict[str, np.ndarray]:
        return {"input_features": np.stack([item.value for item in items])}


FRONTENDS: dict[str, Callable[[dict[str, Any]], FrontEnd]] = {
    "aisfx_blocks": AisfxBlocks,
    "waveform": Waveform,
    "whisper_logmel": WhisperLogMel,
}


@dataclass(frozen=True, slots=True)
class Clip:
    """A decoded clip at the model's rate (for tools that need the waveform)."""

    wave: np.ndarray
    rate: int


@register("audio")
class AudioPreprocessor:
    """Encoded audio bytes to the model's front-end features (see :mod:`.preprocess`)."""

    modality = "audio"

    def __init__(self, manifest: Manifest, model_dir: Path, limits: Limits | None = None) -> None:
        extra = manifest.extra
        try:
            self.rate = int(extra["sample_rate"])
            self.frontend = FRONTENDS[str(extra["frontend"])](extra)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"audio model {manifest.name}: bad front end in manifest ({err}); "
                f"known front ends: {sorted(FRONTENDS)}"
            ) from err
        self.max_seconds = (limits or Limits()).audio_max_seconds

    def load(self, data: bytes) -> Clip:
        wave, rate = decode_audio(data, self.max_seconds)
        return Clip(resample(wave, rate, self.rate), self.rate)

    def prepare_one(self, data: bytes) -> Prepared:
        return self.frontend.features(self.load(data).wave)

    def prepare(self, inputs: Sequence[bytes]) -> list[Prepared | EnvelopeError]:
        return prepare_each(self.prepare_one, inputs)

    def pack(self, items: Sequence[Prepared]) -> dict[str, np.ndarray]:
        return self.frontend.pack(items)
