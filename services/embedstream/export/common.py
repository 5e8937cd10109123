"""What every exporter shares: ONNX writing, staging, parity figures, manifests.

Importing it loads neither torch nor onnx (they load on first use), so the
torch-free ``embedstream quantize`` stages through it too.

A model directory appears only once complete and checked: every exporter
(text, image, audio, word vectors, quantize, fine-tune) writes into a hidden
staging directory beside the target, runs its parity check there, and has
:func:`staging_dir` rename it into place (:func:`install_model_dir`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

import embedstream
from embedstream.errors import EmbedstreamError, ExportError
from embedstream.export.parity import PARITY_MIN_COSINE
from embedstream.models.manifest import NAME_PATTERN, Manifest, file_sha256, load_manifest

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
OUTPUT_NAME = "embedding"


@dataclass(frozen=True, slots=True)
class Parity:
    """Cosines of ONNX against the reference, one per input, and the largest element difference."""

    cosines: tuple[float, ...]
    max_abs_diff: float

    @property
    def min_cosine(self) -> float:
        return min(self.cosines)

    @property
    def mean_cosine(self) -> float:
        return float(np.mean(self.cosines))


def compare(actual: np.ndarray, expected: np.ndarray) -> Parity:
    dot = np.sum(actual * expected, axis=1)
    norms = np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    cosines = dot / np.maximum(norms, 1e-12)
    return Parity(tuple(float(c) for c in cosines), float(np.abs(actual - expected).max()))


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ExportError(f"invalid model name {name!r}: use 1-64 of a-z, 0-9, '.', '_', '-'")
    return name


def export_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    path: Path,
    opset: int = 17,
    output_names: tuple[str, ...] = (OUTPUT_NAME,),
) -> None:
    """TorchScript ONNX export of ``module`` (fp32, eval) and a structural check."""
    import onnx
    import torch

    axes = dict(dynamic_axes)
    for out in output_names:
        axes.setdefault(out, {0: "batch"})
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                module, args, str(path), input_names=input_names, output_names=list(output_names),
                dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        onnx.checker.check_model(str(path))
    except Exception as err:
        raise ExportError(f"ONNX export failed: {err}") from err


def write_manifest(model_dir: Path, **fields: Any) -> Manifest:
    import torch

    fields.setdefault("onnx_file", ONNX_FILE)
    fields.setdefault("outputs", [OUTPUT_NAME])
    manifest = Manifest(
        sha256=file_sha256(model_dir / fields["onnx_file"]),
        exported_at=datetime.now(UTC).isoformat(timespec="seconds"),
        exporter_version=embedstream.__version__,
        **fields,
    )
    extra = dict(manifest.extra)
    extra.setdefault("torch_version", torch.__version__)
    manifest.extra = extra
    manifest.write(model_dir)
    return manifest


@contextmanager
def staging_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden, empty directory beside ``target`` that becomes ``target`` if the block
    succeeds (:func:`install_model_dir`) and is removed if it raises: a model directory
    is never seen half-written, and a failed export leaves nothing behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    try:
        yield staging
        install_model_dir(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_export(out_root: Path, name: str, overwrite: bool) -> Iterator[Path]:
    """:func:`staging_dir` for ``out_root/name``."""
    with staging_dir(Path(out_root) / name, overwrite) as staging:
        yield staging


def install_model_dir(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished ``staging`` directory (a sibling of ``target``) to ``target``.

    Without ``overwrite`` an existing ``target`` whose manifest names the same
    graph checksum is kept as it is (a re-export of the same source is a
    no-op: ``staging`` is removed); one holding another graph is refused. With
    it, the old directory is renamed aside, the new one renamed in, and only
    then the old one removed: at every moment ``target`` is a complete model
    (or, for the instant between the two renames, absent), never half of one.
    """
    if not target.exists():
        staging.rename(target)
        return
    if not overwrite:
        new = load_manifest(staging, verify=False).sha256
        old = _existing_sha256(target)
        if old != new:
            raise ExportError(
                f"model directory {target} exists and holds another model "
                f"(sha256 {(old or 'unknown')[:12]}, this export {new[:12]}); "
                "pass --overwrite to replace it"
            )
        log.info("%s already holds this model (sha256 %s); left as it is", target, new[:12])
        shutil.rmtree(staging, ignore_errors=True)
        return
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        retired.rename(target)  # put the old model back rather than leave none
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _existing_sha256(model_dir: Path) -> str | None:
    """The graph checksum ``model_dir``'s manifest names, or None when it has none
    (or its ONNX file does not match it: that directory is not this export)."""
    try:
        return load_manifest(model_dir).sha256
    except EmbedstreamError:
        return None


def require_parity(name: str, parity: Parity, what: str) -> None:
    log.info("parity of %s: min cosine %.6f, mean %.6f, max |diff| %.2e over %d %s",
             name, parity.min_cosine, parity.mean_cosine, parity.max_abs_diff,
             len(parity.cosines), what)
    if parity.min_cosine < PARITY_MIN_COSINE:
        raise ExportError(
            f"exported {name} disagrees with its reference: min cosine "
            f"{parity.min_cosine:.6f} < {PARITY_MIN_COSINE}"
        )


def torch_embed(fn: Callable[..., torch.Tensor], *arrays: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return fn(*(torch.from_numpy(a) for a in arrays)).float().numpy()


F = TypeVar("F")


def pick_family(families: dict[str, F], family: str, kind: str) -> F:
    """The loader of an exporter family, or a clear error naming the known ones."""
    try:
        return families[family]
    except KeyError as err:
        raise ExportError(f"unknown {kind} family {family!r}; known: {sorted(families)}") from err


def family_reference(
    families: dict[str, Callable[[str | None], Any]], manifest: Manifest, kind: str
) -> torch.nn.Module:
    """The PyTorch module ``manifest``'s model was exported from, rebuilt by its family's
    loader (``extra["family"]``: ``transformers/vit`` is the ``transformers`` family)
    from its ``source``: the reference :func:`runtime_parity` compared it with."""
    family = str(manifest.extra.get("family", "")).split("/")[0]
    module: torch.nn.Module = pick_family(families, family, kind)(manifest.source or None).module
    return module.eval()


def runtime_parity(model_dir: Path, module: torch.nn.Module, payloads: list[bytes]) -> Parity:
    """The exported model, fed by the worker's own preprocessor, against ``module``
    on the very same graph inputs (files -> runtime preprocessing -> both)."""
    from embedstream.runtime.loader import load_model

    loaded = load_model(model_dir, providers=["CPUExecutionProvider"], threads=0)
    prep = loaded.preprocessor
    feeds = prep.pack([prep.prepare_one(p) for p in payloads])  # type: ignore[attr-defined]
    actual = loaded.backend.embed(feeds)
    expected = torch_embed(module, *(feeds[n] for n in loaded.manifest.inputs))
    return compare(actual, expected)
