"""The manifest of an exported model directory.

A model directory holds ``manifest.json``, the ONNX graph and, for text
models, the tokenizer files. The exporter writes it (``embedstream export``,
the only code that imports torch); the worker reads it and nothing else, so
the manifest is the whole contract between the two.

Layout::

    <model_dir>/<name>/
        manifest.json
        model.onnx
        tokenizer.json          (text models)

Graph contract for text models: inputs ``input_ids`` and ``attention_mask``
(int64, ``[batch, seq]``), plus ``token_type_ids`` when listed in ``inputs``;
output ``embedding`` (float32, ``[batch, dimension]``), already pooled and,
when ``normalize`` is true, L2-normalised. A token-mode model also outputs
``token_embeddings`` (``[batch, seq, dimension]``).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from embedstream.errors import ConfigError

MANIFEST_FILE = "manifest.json"
# Names become Redis key segments and index names: keep them plain.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class Manifest(BaseModel):
    """What the runtime needs to know about one exported model."""

    name: str = Field(description="Model name; key segment in Redis and the event's 'model'.")
    modality: Literal["text", "image", "audio"]
    dimension: int = Field(gt=0, description="Length of the pooled embedding.")
    pooling: str = Field(description="How token/frame outputs are pooled, e.g. 'mean', 'cls'.")
    normalize: bool = Field(description="True when the graph L2-normalises its output.")
    onnx_file: str = "model.onnx"
    inputs: list[str] = Field(description="Graph input names, in the order the runtime feeds.")
    outputs: list[str] = Field(default_factory=lambda: ["embedding"])
    tokenizer_files: list[str] = Field(default_factory=list)
    max_length: int = Field(0, ge=0, description="Longest token sequence (text); 0 if n/a.")
    opset: int
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    sha256: str = Field(description="SHA-256 of the ONNX file.")
    source: str = Field("", description="Checkpoint the model was exported from.")
    exported_at: str = ""
    exporter_version: str = ""
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Family-specific settings (preprocessing etc.)."
    )

    def onnx_path(self, model_dir: Path) -> Path:
        return model_dir / self.onnx_file

    def write(self, model_dir: Path) -> Path:
        path = model_dir / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(model_dir: Path, verify: bool = True) -> Manifest:
    """Read and check ``model_dir/manifest.json``.

    With ``verify``, the ONNX file's checksum must match the manifest, so a
    half-copied or swapped model fails at load, not with odd vectors later.
    """
    path = model_dir / MANIFEST_FILE
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as err:
        raise ConfigError(f"no model at {model_dir}: {MANIFEST_FILE} is missing") from err
    except (json.JSONDecodeError, ValidationError) as err:
        raise ConfigError(f"invalid manifest {path}: {err}") from err
    if not NAME_PATTERN.match(manifest.name):
        raise ConfigError(
            f"invalid model name {manifest.name!r} in {path}: use a-z, 0-9, '.', '_', '-'"
        )
    onnx_path = manifest.onnx_path(model_dir)
    if not onnx_path.is_file():
        raise ConfigError(f"model file {onnx_path} named by {path} is missing")
    if verify and file_sha256(onnx_path) != manifest.sha256:
        raise ConfigError(f"checksum mismatch for {onnx_path}: the file does not match {path}")
    for name in manifest.tokenizer_files:
        if not (model_dir / name).is_file():
            raise ConfigError(f"tokenizer file {model_dir / name} named by {path} is missing")
    return manifest


def find_models(root: Path) -> dict[str, Path]:
    """Model name -> directory for every model directory directly under ``root``."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if (child / MANIFEST_FILE).is_file():
            data = json.loads((child / MANIFEST_FILE).read_text(encoding="utf-8"))
            found[str(data.get("name", child.name))] = child
    return found
