"""Image preprocessing: decode with Pillow, resize, crop and normalise in numpy.

What the model expects comes from its manifest's ``extra`` (the exporter
writes it; torchvision is never needed)::

    image_size      [height, width] fed to the graph
    resize          shorter side before the crop; 0: resize straight to image_size
    crop            "center" or "none"
    interpolation   "bilinear" | "bicubic" | "nearest" | "lanczos"
    rescale         factor applied to 0..255 pixel values (usually 1/255)
    mean, std       per-channel normalisation after rescaling (RGB order)

Graph contract: input ``pixel_values`` float32 ``[batch, 3, height, width]``;
output ``embedding`` ``[batch, dimension]``. Each image costs 1 in the batch
budget (every image becomes the same tensor size).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from embedstream.errors import ConfigError, EnvelopeError
from embedstream.models.manifest import Manifest
from embedstream.preprocess.base import Limits, Prepared, prepare_each, register

log = logging.getLogger(__name__)

# Formats we decode. Anything else (TIFF, PSD, ...) is "unsupported_format":
# every extra decoder is attack surface.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _looks_like_supported(data: bytes) -> bool:
    return data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` to an RGB image (first frame of an animation, EXIF rotation applied).

    Raises :class:`EnvelopeError`: ``unsupported_format``, ``image_too_large``
    (checked from the header, before any pixel is decoded) or ``invalid_image``.
    """
    if not data:
        raise EnvelopeError("invalid_image", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as err:
        if _looks_like_supported(data):
            raise EnvelopeError("invalid_image", f"corrupt image header: {err}") from err
        raise EnvelopeError(
            "unsupported_format", f"not one of {', '.join(FORMATS)}: {data[:8]!r}"
        ) from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise EnvelopeError("image_too_large", str(err)) from err
    except Exception as err:  # Pillow raises many types on hostile input
        raise EnvelopeError("invalid_image", f"cannot open image: {err}") from err
    width, height = image.size
    if width * height > max_pixels:
        raise EnvelopeError(
            "image_too_large", f"{width}x{height} = {width * height} pixels, limit {max_pixels}"
        )
    try:
        image.seek(0)
        image.load()
        upright: Image.Image = ImageOps.exif_transpose(image) or image
        return upright.convert("RGB")
    except Exception as err:  # truncated data, bad chunks, decoder errors
        raise EnvelopeError("invalid_image", f"cannot decode {image.format} image: {err}") from err


class ImageTransform:
    """The manifest's resize / crop / normalise, on a decoded RGB image."""

    def __init__(self, extra: dict[str, object], name: str = "") -> None:
        try:
            size = extra["image_size"]
            assert isinstance(size, list | tuple)
            self.height, self.width = int(size[0]), int(size[1])
            self.resize = int(extra.get("resize", 0))  # type: ignore[call-overload]
            self.crop = str(extra.get("crop", "center"))
            self.resample = _RESAMPLE[str(extra.get("interpolation", "bilinear"))]
            self.rescale = float(extra.get("rescale", 1 / 255))  # type: ignore[arg-type]
            mean, std = extra.get("mean", [0.0] * 3), extra.get("std", [1.0] * 3)
            self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
            self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        except (KeyError, AssertionError, TypeError, ValueError) as err:
            raise ConfigError(f"image model {name}: bad preprocessing in manifest: {err}") from err

    def __call__(self, image: Image.Image) -> np.ndarray:
        """``[3, height, width]`` float32."""
        if self.resize:
            w, h = image.size
            scale = self.resize / min(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            image = image.resize(size, self.resample)
        else:
            image = image.resize((self.width, self.height), self.resample)
        if self.crop == "center" and image.size != (self.width, self.height):
            w, h = image.size
            left = round((w - self.width) / 2.0)
            top = round((h - self.height) / 2.0)
            image = image.crop((left, top, left + self.width, top + self.height))
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * self.rescale
        return np.ascontiguousarray((pixels - self.mean) / self.std, dtype=np.float32)


@register("image")
class ImagePreprocessor:
    """Encoded image bytes to ``pixel_values`` (see :mod:`.preprocess`)."""

    modality = "image"

    def __init__(self, manifest: Manifest, model_dir: Path, limits: Limits | None = None) -> None:
        self.transform = ImageTransform(manifest.extra, manifest.name)
        self.max_pixels = (limits or Limits()).image_max_pixels

    def prepare_one(self, data: bytes) -> Prepared:
        return Prepared(self.transform(decode_image(data, self.max_pixels)), 1)

    def prepare(self, inputs: Sequence[bytes]) -> list[Prepared | EnvelopeError]:
        return prepare_each(self.prepare_one, inputs)

    def pack(self, items: Sequence[Prepared]) -> dict[str, np.ndarray]:
        return {"pixel_values": np.stack([item.value for item in items])}
