"""Bench inputs for image and audio models: seeded, varied, every item unique.

Images are scenes with structure a CNN responds to: a linear or radial
gradient, 3-14 shapes (ellipses, rectangles, polygons, thick lines) and
noise (over the whole JPEG, over a patch of a PNG), 160-1024 px a side,
about 60% JPEG (quality 70-95) and 40% PNG. Clips are WAV (16-bit PCM) of
0.5-10 s at 16-48 kHz, mono and some stereo, each a mix of 1-3 of: harmonic
tones, linear or exponential chirps, white or brown noise, under an
envelope (steady, decaying, tremolo, bursts).

Every file stays under :data:`MAX_FILE_BYTES`, so it travels inline
(base64 in the JSON envelope) under Kafka's default 1 MiB record limit;
long clips therefore get the lower rates. ``--file`` takes the user's own
files (a directory is walked); larger ones are left out with a warning.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from embedstream.errors import BenchError
from embedstream.producer import find_files

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 700_000
"""Largest bench file: base64 makes it 4/3 larger, and a record must stay under 1 MiB."""
IMAGE_SIDES = (160, 1024)
CLIP_SECONDS = (0.5, 10.0)
CLIP_RATES = (16000, 22050, 32000, 44100, 48000)


# ------------------------------------------------------------------ images
def generated_images(count: int, seed: int = 7) -> list[bytes]:
    """``count`` unique JPEG and PNG files (see the module docstring)."""
    rng = np.random.default_rng(seed)
    return _unique(count, lambda: _image_file(rng))


def _image_file(rng: np.random.Generator) -> bytes:
    from PIL import Image

    width, height = (int(v) for v in rng.integers(IMAGE_SIDES[0], IMAGE_SIDES[1] + 1, size=2))
    pixels = _gradient(rng, width, height)
    image = Image.fromarray(pixels)
    _shapes(rng, image)
    pixels = np.asarray(image, dtype=np.float32)
    png = rng.random() < 0.4
    sigma = float(rng.uniform(2, 20))
    if png:  # noise on a patch only: PNG of noise everywhere would be huge
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = x0 + int(rng.integers(16, width // 2 + 1)), y0 + int(rng.integers(16, height // 2 + 1))
        patch = pixels[y0:y1, x0:x1]
        patch += rng.normal(0, sigma, patch.shape)
    else:
        pixels += rng.normal(0, sigma, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    quality = int(rng.integers(70, 96))
    data = _encode(image, "PNG" if png else "JPEG", quality)
    while len(data) > MAX_FILE_BYTES:  # noisy PNGs of the largest sizes: JPEG instead
        quality -= 10
        data = _encode(image, "JPEG", max(quality, 30))
    return data


def _encode(image: Any, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """``[height, width, 3]`` uint8: a linear gradient at a random angle, or a radial one."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if rng.random() < 0.7:
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
    else:
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        t = np.hypot(x - cx, y - cy)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return (start + t[..., None] * (end - start)).astype(np.uint8)


def _shapes(rng: np.random.Generator, image: Any) -> None:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(int(rng.integers(3, 15))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, x1 = sorted(int(v) for v in rng.integers(-width // 4, width + width // 4, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(-height // 4, height + height // 4, 2))
        kind = int(rng.integers(0, 4))
        if kind == 0:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=color)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif kind == 2:
            corners = int(rng.integers(3, 7))
            points = [(int(rng.integers(0, width)), int(rng.integers(0, height)))
                      for _ in range(corners)]
            draw.polygon(points, fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(2, 24)))


def describe_images(images: list[bytes]) -> dict[str, Any]:
    """Formats and size range (from the headers; nothing is decoded)."""
    from PIL import Image

    formats: dict[str, int] = {}
    sides: list[tuple[int, int]] = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            formats[str(image.format)] = formats.get(str(image.format), 0) + 1
            sides.append(image.size)
    widths, heights = [w for w, _ in sides], [h for _, h in sides]
    return {
        "images": len(images), "formats": formats,
        "width_px": [min(widths), max(widths)], "height_px": [min(heights), max(heights)],
        "mean_megapixels": round(float(np.mean([w * h for w, h in sides])) / 1e6, 3),
        "mean_file_kb": round(sum(map(len, images)) / len(images) / 1024, 1),
    }


# ------------------------------------------------------------------ audio
def generated_clips(count: int, seed: int = 7) -> list[bytes]:
    """``count`` unique WAV files (see the module docstring)."""
    rng = np.random.default_rng(seed)
    return _unique(count, lambda: _clip_file(rng))


def _clip_file(rng: np.random.Generator) -> bytes:
    import soundfile as sf

    seconds = float(rng.uniform(*CLIP_SECONDS))
    rates = [r for r in CLIP_RATES if seconds * r * 2 <= MAX_FILE_BYTES - 1024]
    rate = int(rng.choice(rates))
    t = np.arange(int(seconds * rate), dtype=np.float64) / rate
    mix = sum(_component(rng, t, rate) * _envelope(rng, t)
              for _ in range(int(rng.integers(1, 4))))
    mix = np.asarray(mix, dtype=np.float64)
    mix *= rng.uniform(0.2, 0.95) / max(float(np.abs(mix).max()), 1e-9)
    channels = 2 if seconds * rate * 4 <= MAX_FILE_BYTES - 1024 and rng.random() < 0.3 else 1
    if channels == 2:  # the second channel: quieter, slightly delayed
        delay = int(rng.integers(1, rate // 100 + 2))
        mix = np.stack([mix, np.roll(mix, delay) * rng.uniform(0.3, 1.0)], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, mix.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _component(rng: np.random.Generator, t: np.ndarray, rate: int) -> np.ndarray:
    nyquist = rate / 2
    kind = int(rng.integers(0, 3))
    if kind == 0:  # a tone with a few decaying harmonics
        f0 = rng.uniform(60, min(3000, nyquist / 4))
        return sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) / k**1.5
                   for k in range(1, int(rng.integers(1, 5)) + 1))
    if kind == 1:  # a linear or exponential chirp
        f0, f1 = rng.uniform(50, nyquist * 0.8, 2)
        span = max(float(t[-1]), 1e-3)
        if rng.random() < 0.5:
            phase = f0 * t + (f1 - f0) * t**2 / (2 * span)
        else:
            k = (f1 / f0) ** (1 / span)
            phase = f0 * (k**t - 1) / np.log(k) if abs(k - 1) > 1e-9 else f0 * t
        return np.sin(2 * np.pi * phase)
    noise = rng.normal(0, 1, t.shape)
    if rng.random() < 0.5:  # brown(ish) noise: white noise through a leaky integrator
        from scipy.signal import lfilter

        noise = lfilter([1.0], [1.0, -0.995], noise)
    return noise / max(float(np.abs(noise).max()), 1e-9)


def _envelope(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return np.ones_like(t)
    if kind == 1:  # decays, restarting every period (plucks, hits)
        period = rng.uniform(0.2, 3.0)
        return np.exp(-rng.uniform(2, 12) * (t % period))
    if kind == 2:  # tremolo
        return 0.55 + 0.45 * np.sin(2 * np.pi * rng.uniform(0.5, 8) * t)
    on = rng.uniform(0.05, 0.5)  # bursts: on for `on` s of every `period` s
    period = on + rng.uniform(0.05, 0.8)
    return ((t % period) < on).astype(np.float64)


def describe_clips(clips: list[bytes]) -> dict[str, Any]:
    """Durations, rates and formats (from the headers)."""
    seconds, rates, formats, channels = clip_headers(clips)
    return {
        "clips": len(clips), "audio_seconds": round(sum(seconds), 1),
        "clip_seconds": [round(min(seconds), 2), round(max(seconds), 2)],
        "mean_clip_seconds": round(sum(seconds) / len(seconds), 2),
        "sample_rates": sorted(set(rates)), "formats": formats,
        "stereo": sum(1 for c in channels if c > 1),
    }


def clip_headers(clips: list[bytes]) -> tuple[list[float], list[int], dict[str, int], list[int]]:
    """Per clip: duration (s), rate and channels; and the count per format."""
    import soundfile as sf

    seconds, rates, channels = [], [], []
    formats: dict[str, int] = {}
    for data in clips:
        info = sf.info(io.BytesIO(data))
        seconds.append(float(info.duration))
        rates.append(int(info.samplerate))
        channels.append(int(info.channels))
        formats[str(info.format)] = formats.get(str(info.format), 0) + 1
    return seconds, rates, formats, channels


# ------------------------------------------------------------------ shared
def _unique(count: int, make: Callable[[], bytes]) -> list[bytes]:
    seen: set[bytes] = set()
    out: list[bytes] = []
    while len(out) < count:
        data = make()
        digest = hashlib.sha256(data).digest()
        if digest not in seen:
            seen.add(digest)
            out.append(data)
    return out


def file_media(path: Path, modality: str, limit: int | None = None) -> list[bytes]:
    """The image or audio files at ``path`` (a file or a directory, walked), up to ``limit``.

    Files over :data:`MAX_FILE_BYTES` are left out with a warning (they
    would not fit an inline record).
    """
    try:
        files = find_files([path], modality)
    except FileNotFoundError as err:
        raise BenchError(str(err)) from err
    out: list[bytes] = []
    skipped = 0
    for file in files:
        if limit and len(out) >= limit:
            break
        try:
            data = file.read_bytes()
        except OSError as err:
            raise BenchError(f"cannot read bench input {file}: {err}") from err
        if len(data) > MAX_FILE_BYTES:
            skipped += 1
            continue
        out.append(data)
    if skipped:
        log.warning("left out %d files over %d bytes (too large to send inline)",
                    skipped, MAX_FILE_BYTES)
    if not out:
        raise BenchError(f"{path} holds no {modality} files the bench can use")
    return out
