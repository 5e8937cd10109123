"""Graph fusion and int8 quantization of exported text models.

ONNX Runtime only (its ``transformers`` optimizer and ``quantization``
packages): no torch here, so ``embedstream quantize`` runs without it.

Fusion turns the exporter's primitive ops into ONNX Runtime's fused kernels
(EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu); the
counts are kept in the manifest (``extra.fusions``) so a graph that did not
fuse is visible. Quantization is dynamic (weights int8 per output channel,
activations quantized at run time), for CPUs; it must pass a quality gate
against the fp32 model it came from before its directory appears.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from embedstream.errors import ExportError
from embedstream.export.common import staging_dir
from embedstream.export.parity import PARITY_SENTENCES, encode_onnx
from embedstream.models.manifest import NAME_PATTERN, Manifest, file_sha256, load_manifest

log = logging.getLogger(__name__)

# Families whose encoder the ``bert`` fusion patterns match.
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "camembert", "electra"}
# Quality gates of derived models against their fp32 source (cosine): int8 is
# lossy by design; fp16 (for GPUs) should lose next to nothing.
INT8_MIN_MEAN_COSINE = 0.99
INT8_MIN_COSINE = 0.98
FP16_MIN_MEAN_COSINE = 0.9999
FP16_MIN_COSINE = 0.999


def fuse_text_graph(onnx_path: Path, model_type: str, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Fuse ``onnx_path`` in place; return the fused-operator counts (empty: not fused).

    Families the bert patterns do not cover, and graphs the optimizer fails on,
    are left as exported (and logged): ONNX Runtime still applies its generic
    fusions when it loads the graph, and the parity check judges the result.
    """
    if model_type not in _BERT_LIKE or not num_heads or not hidden_size:
        log.info("no transformer fusion for model type %r; graph left as exported", model_type)
        return {}
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        optimized = optimize_model(
            str(onnx_path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size
        )
        stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
        optimized.save_model_to_file(str(onnx_path))
    except Exception as err:  # the optimizer raises untyped errors; the graph is untouched
        log.warning("graph fusion of %s failed (%s); graph left as exported", onnx_path, err)
        return {}
    log.info("fused %s: %s", onnx_path.name, stats)
    return stats


def gate_sentences() -> list[str]:
    """The fixed sentence set of the quality gate: the sample file plus the parity set."""
    text = resources.files("embedstream").joinpath("data/sample_sentences.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()] + list(PARITY_SENTENCES)


@dataclass(frozen=True, slots=True)
class QualityReport:
    """Cosine of a derived model's embeddings to its fp32 source, per sentence."""

    min_cosine: float
    mean_cosine: float
    sentences: int
    precision: str = "int8"

    def gate(self) -> tuple[float, float]:
        """(least mean cosine, least min cosine) that pass, for this precision."""
        if self.precision == "fp16":
            return FP16_MIN_MEAN_COSINE, FP16_MIN_COSINE
        return INT8_MIN_MEAN_COSINE, INT8_MIN_COSINE

    def passed(self) -> bool:
        least_mean, least_min = self.gate()
        return self.mean_cosine >= least_mean and self.min_cosine >= least_min


def compare_models(source_dir: Path, derived_dir: Path, sentences: list[str]) -> QualityReport:
    """Embed ``sentences`` with both model directories and compare them."""
    derived = load_manifest(derived_dir)
    expected = encode_onnx(source_dir, load_manifest(source_dir), sentences, batch_size=16)
    actual = encode_onnx(derived_dir, derived, sentences, batch_size=16)
    cosines = cosine_rows(actual, expected)
    return QualityReport(float(cosines.min()), float(cosines.mean()), len(sentences),
                         derived.precision)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``[n, d]`` arrays."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.asarray(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12))


def quantize_int8(
    source_dir: Path, name: str | None = None, *, force: bool = False, overwrite: bool = False
) -> tuple[Path, QualityReport]:
    """Write ``<name>`` (default ``<source>-int8``) beside ``source_dir``: int8 dynamic weights.

    Per-channel int8 weights, first of every MatMul and fused Attention, then
    (when that misses the gate) of the MatMuls only: the fused attention
    projections are the sensitive part. The result must reach mean cosine
    >= 0.99 and min >= 0.98 to the source on :func:`gate_sentences`; otherwise
    :class:`ExportError` (with ``force``: a warning, and the last try is kept).
    """
    return _derive(source_dir, name, "int8", force=force, overwrite=overwrite)


def convert_fp16(
    source_dir: Path, name: str | None = None, *, force: bool = False, overwrite: bool = False
) -> tuple[Path, QualityReport]:
    """Write ``<name>`` (default ``<source>-fp16``) beside ``source_dir``: fp16 weights and
    activations, for GPUs (tensor cores); inputs and the output stay int64 / float32, so
    the runtime and Redis see no difference. Gate: mean cosine >= 0.9999, min >= 0.999
    (checked here on the CPU, where fp16 runs but brings no speed)."""
    return _derive(source_dir, name, "fp16", force=force, overwrite=overwrite)


def _derive(
    source_dir: Path, name: str | None, precision: str, *, force: bool, overwrite: bool
) -> tuple[Path, QualityReport]:
    """Stage the derived model beside the source; it appears only once it passed the gate."""
    source = load_manifest(source_dir)
    if source.precision != "fp32":
        raise ExportError(f"{source.name} is {source.precision}; quantize an fp32 model")
    if source.modality != "text":
        raise ExportError(f"{source.name} is a {source.modality} model; the quality gate "
                          "embeds sentences, so only text models are derived")
    name = name or f"{source.name}-{precision}"
    if not NAME_PATTERN.match(name):
        raise ExportError(f"invalid model name {name!r}: use a-z, 0-9, '.', '_', '-'")
    target = source_dir.parent / name
    if target.exists() and not overwrite:
        raise ExportError(f"model directory {target} exists; pass --overwrite to replace it")
    with staging_dir(target, overwrite) as staging:
        for file in source.tokenizer_files:
            shutil.copy2(source_dir / file, staging / file)
        _, report = _convert_gated(source_dir, staging, name, precision, force)
    return target, report


def _int8_writer(op_types: list[str] | None) -> Callable[[Path, Path], None]:
    def write(source: Path, out: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(source), str(out), per_channel=True, weight_type=QuantType.QInt8,
            op_types_to_quantize=op_types,
            # Fused ops (com.microsoft domain) defeat shape inference: their
            # outputs are float32, say so.
            extra_options={"DefaultTensorType": 1},  # onnx.TensorProto.FLOAT
        )
    return write


def _write_fp16(source: Path, out: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(converted, str(out))


# Per precision, tried in order; the first that passes the gate is kept.
_STRATEGIES: dict[str, tuple[tuple[str, Callable[[Path, Path], None]], ...]] = {
    "int8": (
        ("matmul+attention", _int8_writer(None)),
        ("matmul-only", _int8_writer(["MatMul"])),
    ),
    "fp16": (("fp16, float32 inputs and output", _write_fp16),),
}
_DESCRIPTIONS = {"int8": "int8 dynamic per-channel", "fp16": "fp16"}


def _convert_gated(
    source_dir: Path, staging: Path, name: str, precision: str, force: bool
) -> tuple[Manifest, QualityReport]:
    source = load_manifest(source_dir)
    onnx_out = staging / source.onnx_file
    sentences = gate_sentences()
    verdicts = []
    for label, write in _STRATEGIES[precision]:
        try:
            write(source.onnx_path(source_dir), onnx_out)
        except Exception as err:  # the converters raise untyped errors
            raise ExportError(f"{precision} conversion of {source.name} failed: {err}") from err
        manifest = source.model_copy(
            update={
                "name": name, "precision": precision, "sha256": file_sha256(onnx_out),
                "source": f"{source.name} ({_DESCRIPTIONS[precision]}, {label})",
                "extra": {**source.extra, "quantized_from": source.name, "quantized": label},
            }
        )
        manifest.write(staging)
        report = compare_models(source_dir, staging, sentences)
        verdict = (f"{name} ({label}): cosine to {source.name} mean {report.mean_cosine:.4f}, "
                   f"min {report.min_cosine:.4f} over {report.sentences} sentences")
        log.info("%s", verdict)
        verdicts.append(verdict)
        if report.passed():
            break
    else:
        least_mean, least_min = report.gate()
        if not force:
            raise ExportError(
                "; ".join(verdicts) + f": below the gate (mean >= {least_mean}, "
                f"min >= {least_min}); not written (--force keeps the last)"
            )
        log.warning("%s: below the quality gate, kept because of --force", verdicts[-1])
    manifest.extra["quality_vs_fp32"] = {
        "min_cosine": round(report.min_cosine, 6), "mean_cosine": round(report.mean_cosine, 6),
    }
    manifest.write(staging)
    return manifest, report
