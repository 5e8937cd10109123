"""int8 and fp16 derived models: the quality gate keeps a good model and refuses a bad one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from embedstream.errors import ExportError
from embedstream.export import optimize
from embedstream.export.optimize import convert_fp16, quantize_int8
from embedstream.models.manifest import find_models, load_manifest
from embedstream.runtime.loader import load_model

MODEL = "all-minilm-l6-v2"


@pytest.fixture
def models(model_root: Path, tmp_path: Path) -> Path:
    """A private copy of the exported fp32 model (the session root stays as it is)."""
    shutil.copytree(model_root / MODEL, tmp_path / MODEL)
    return tmp_path


def test_int8_passes_the_gate(models: Path) -> None:
    target, report = quantize_int8(models / MODEL)
    assert target == models / f"{MODEL}-int8"
    assert report.mean_cosine >= 0.99 and report.min_cosine >= 0.98
    manifest = load_manifest(target)  # checksum verified
    assert manifest.precision == "int8"
    assert manifest.extra["quality_vs_fp32"]["mean_cosine"] >= 0.99
    vectors = load_model(target, providers=[], threads=1).embed_texts(["hello", "a longer one"])
    assert vectors.shape == (2, 384)


def test_int8_below_the_gate_is_refused(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimize, "INT8_MIN_COSINE", 0.99999)
    monkeypatch.setitem(
        optimize._STRATEGIES, "int8", (("matmul-only", optimize._int8_writer(["MatMul"])),))
    with pytest.raises(ExportError, match="below the gate"):
        quantize_int8(models / MODEL, "refused")
    assert sorted(find_models(models)) == [MODEL]  # nothing written, no staging left
    assert sorted(p.name for p in models.iterdir()) == [MODEL]
    kept, report = quantize_int8(models / MODEL, "forced", force=True)
    assert kept.is_dir() and not report.passed()


def test_only_fp32_is_quantized(models: Path) -> None:
    target, _ = quantize_int8(models / MODEL)
    with pytest.raises(ExportError, match="quantize an fp32 model"):
        quantize_int8(target)


def test_fp16_keeps_float32_io_and_passes_its_stricter_gate(models: Path) -> None:
    import onnx

    target, report = convert_fp16(models / MODEL)
    assert target == models / f"{MODEL}-fp16"
    assert report.precision == "fp16" and report.mean_cosine >= 0.9999
    assert report.min_cosine >= 0.999
    manifest = load_manifest(target)
    assert manifest.precision == "fp16"
    graph = onnx.load(str(manifest.onnx_path(target))).graph
    weights = {init.data_type for init in graph.initializer if len(init.dims) == 2}
    assert onnx.TensorProto.FLOAT16 in weights  # the matrices are fp16 now
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    model = load_model(target, providers=[], threads=1)
    vectors = model.embed_texts(["hello", "a longer sentence to embed"])
    assert vectors.dtype == "float32" and vectors.shape == (2, 384)


def test_fp16_below_its_gate_is_refused(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimize, "FP16_MIN_COSINE", 1.01)  # nothing can pass
    with pytest.raises(ExportError, match=r"below the gate \(mean >= 0.9999, min >= 1.01\)"):
        convert_fp16(models / MODEL)
    assert sorted(p.name for p in models.iterdir()) == [MODEL]
